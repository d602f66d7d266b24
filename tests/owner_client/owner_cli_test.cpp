// flexfed-owner as a real process: the owner's whole local workflow, and its refusals.
#include <catch2/catch.hpp>

#include <filesystem>
#include <optional>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_format.h"
#include "common/core/file_util.h"
#include "tests/test_util.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

using testing::RunCommand;
using testing::TempDir;
namespace fs = std::filesystem;

std::string Owner() { return testing::BinaryFromEnv("FLEXFED_OWNER"); }

void WriteText(const std::string& dir, const std::string& line, int docs) {
  fs::create_directories(dir);
  for (int d = 0; d < docs; ++d) {
    std::string text;
    for (int i = 0; i < 40; ++i) text += absl::StrCat(line, " ", (d * 40 + i) % 97, "\n");
    REQUIRE(WriteFileAtomically(absl::StrCat(dir, "/", d, ".txt"), text).ok());
  }
}

TEST_CASE("an owner's workflow: router-init, train, export, inspect, eval", "[owner_cli]") {
  TempDir dir;
  WriteText(dir / "public", "the quick brown fox jumps over the lazy dog", 20);
  WriteText(dir / "mine", "SELECT name FROM users WHERE id =", 20);
  const std::string env = absl::StrCat("FLEXFED_CACHE_DIR=", dir / "cache", " ");
  const std::string o = env + Owner();
  const std::string small = " --seq-len 64 --batch-size 4 --warmup 2 --val-every 0 --threads 2 --plain";
  std::string out;
  // The operator's side, locally: an anchor and its r_pub.
  REQUIRE(RunCommand(o + " train --pretrain test --data " + dir / "public" + " --run " + dir / "anchor_run" + " --steps 20" + small, &out) == 0);
  fs::copy(dir / "anchor_run/model", dir / "anchor");
  REQUIRE(RunCommand(o + " router-init --anchor " + dir / "anchor" + " --data " + dir / "public" + " --public --out " + dir / "anchor/router_pub.safetensors", &out) == 0);
  // The owner's side.
  REQUIRE(RunCommand(o + " router-init --anchor " + dir / "anchor" + " --data " + dir / "mine" + " --out " + dir / "r.safetensors", &out) == 0);
  int64_t planned_total = 0;
  {  // the memory plan, as data, before anything is allocated or written
    REQUIRE(RunCommand(o + " train --anchor " + dir / "anchor" + " --router-init " + dir / "r.safetensors" + " --data " +
                           dir / "mine" + " --run " + dir / "planned" + " --steps 8 --memory-report --json" + small, &out) == 0);
    const nlohmann::json full = nlohmann::json::parse(out);
    planned_total = full["total_bytes"].get<int64_t>();
    REQUIRE(RunCommand(o + " train --anchor " + dir / "anchor" + " --router-init " + dir / "r.safetensors" + " --data " +
                           dir / "mine" + " --run " + dir / "planned" + " --steps 8 --memory-report --json" +
                           " --activation-checkpointing --optimizer-moments bf16" + small, &out) == 0);
    const nlohmann::json compact = nlohmann::json::parse(out);
    CHECK(compact["fits"] == true);
    CHECK(compact["total_bytes"].get<int64_t>() < full["total_bytes"].get<int64_t>());
    CHECK(compact["parts"][3]["bytes"].get<int64_t>() * 2 == full["parts"][3]["bytes"].get<int64_t>());  // bf16 moments
    CHECK_THAT(compact["parts"][3]["detail"].get<std::string>(), Catch::Contains("bf16"));
    CHECK_THAT(compact.dump(), Catch::Contains("checkpointed"));
    CHECK_FALSE(fs::exists(dir / "planned"));
    // Held to less than it plans (--memory-limit), the run is refused with the settings that fit,
    // each of which the plan then accepts; nothing is written.
    const std::string plan_args = o + " train --anchor " + dir / "anchor" + " --router-init " + dir / "r.safetensors" +
                                  " --data " + dir / "mine" + " --run " + dir / "planned" + " --steps 8" + small;
    const std::string limit = absl::StrFormat(" --memory-limit %.9f", 0.8 * full["total_bytes"].get<double>() / 1073741824.0);
    REQUIRE(RunCommand(plan_args + limit + " --memory-report --json", &out) == 0);
    const nlohmann::json held = nlohmann::json::parse(out);
    CHECK(held["fits"] == false);
    CHECK_THAT(held["available"].get<std::string>(), Catch::Contains("--memory-limit"));
    REQUIRE(held["fitting"].size() >= 1);
    for (const auto& f : held["fitting"]) {
      const std::string args = f["args"].get<std::string>();
      INFO(args);
      // The test's --batch-size 4 and --seq-len 64 stay where the suggestion does not change them.
      std::string changed = plan_args;
      if (args.find("--batch-size") != std::string::npos) changed = absl::StrReplaceAll(changed, {{" --batch-size 4", ""}});
      REQUIRE(RunCommand(changed + " " + args + limit + " --memory-report --json", &out) == 0);
      const nlohmann::json refit = nlohmann::json::parse(out);
      CHECK(refit["fits"] == true);
      CHECK(refit["total_bytes"] == f["total_bytes"]);
    }
    CHECK(RunCommand(plan_args + limit, &out) == 1);
    CHECK_THAT(out, Catch::Contains("these fit, training on the same sequences per step: " +
                                    held["fitting"][0]["args"].get<std::string>()));
    CHECK_FALSE(fs::exists(dir / "planned"));
  }
  REQUIRE(RunCommand(o + " train --anchor " + dir / "anchor" + " --router-init " + dir / "r.safetensors" + " --data " +
                         dir / "mine" + " --run " + dir / "run" + " --steps 8" + small, &out) == 0);
  CHECK_THAT(out, Catch::Contains("step 8/8"));
  CHECK_THAT(out, Catch::Contains(at::hasCUDA() ? "training on cuda:0, bf16 autocast" : "training on cpu ("));
  CHECK(fs::exists(dir / "run/metrics.jsonl"));
  {  // after the first step, what it reached beside the plan --memory-report printed
    CHECK_THAT(out, Catch::Contains("memory after the first step: peak resident"));
    std::ifstream metrics(dir / "run/metrics.jsonl");
    std::optional<nlohmann::json> memory;
    for (std::string line; std::getline(metrics, line);) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j.contains("peak_resident_bytes")) memory = j;
    }
    REQUIRE(memory.has_value());
    CHECK((*memory)["step"] == 1);
    CHECK((*memory)["planned_bytes"].get<int64_t>() == planned_total);
    CHECK((*memory)["peak_resident_bytes"].get<int64_t>() > planned_total);  // the program itself, on top
  }
  CHECK(fs::exists(dir / "run/train_config.json"));
  // The extraction audit of the trained model, on the owner's data; export records its summary.
  REQUIRE(RunCommand(o + " audit --run " + dir / "run" + " --data " + dir / "mine" +
                         " --samples 3 --prefix-tokens 8 --continuation-tokens 24 --min-continuation-tokens 8 --plain --json",
                     &out) == 0);
  const nlohmann::json audit = nlohmann::json::parse(out.substr(out.find('{')));
  CHECK(audit["audited"] == 3);
  CHECK(audit["complete"] == true);
  CHECK(fs::exists(dir / "run/audit/extraction.jsonl"));
  REQUIRE(RunCommand(o + " export --run " + dir / "run" + " --anchor " + dir / "anchor" + " --out " + dir / "mine.safetensors" +
                         " --owner acme --name sql --domain 'SQL queries'", &out) == 0);
  CHECK_THAT(out, Catch::Contains("extraction rate"));
  REQUIRE(RunCommand(o + " inspect " + dir / "mine.safetensors" + " --anchor " + dir / "anchor" + " --json", &out) == 0);
  nlohmann::json j = nlohmann::json::parse(out);
  CHECK(j["valid"] == true);
  CHECK(j["metadata"]["owner"] == "acme");
  const nlohmann::json privacy = nlohmann::json::parse(j["metadata"]["privacy"].get<std::string>());
  CHECK(privacy["extraction"]["audited"] == 3);
  CHECK(privacy["extraction"]["rate"] == audit["rate"]);
  CHECK(privacy["extraction"].dump().find("SELECT") == std::string::npos);  // counts, never the owner's text
  CHECK(j["metadata"]["tokens_trained"] == "2048");  // 8 steps × 4 × 64
  CHECK(j["tensors"].size() == 10);                  // 2 layers × (gate, up, down, router row, bias)
  for (const auto& t : j["tensors"]) CHECK(t["sha256"].get<std::string>().size() == 64);
  REQUIRE(RunCommand(o + " eval " + dir / "run/model" + " --data " + dir / "mine" + " --seq-len 64 --json", &out) == 0);
  CHECK(nlohmann::json::parse(out)["bits_per_byte"].get<double>() > 0);

  {  // a file that is not an expert module is refused by inspect
    REQUIRE(RunCommand(o + " inspect " + dir / "anchor/router_pub.safetensors" + " --anchor " + dir / "anchor", &out) == 1);
    CHECK_THAT(out, Catch::Contains("not a FlexFed expert module"));
  }
  {  // resuming with other settings is refused
    CHECK(RunCommand(o + " train --anchor " + dir / "anchor" + " --router-init " + dir / "r.safetensors" + " --run " + dir / "run" + " --resume --lr 0.5", &out) == 1);
    CHECK_THAT(out, Catch::Contains("different 'lr'"));
  }
  {  // starting over an existing run is refused
    CHECK(RunCommand(o + " train --anchor " + dir / "anchor" + " --router-init " + dir / "r.safetensors" + " --data " + dir / "mine" +
                         " --run " + dir / "run" + " --steps 8", &out) == 1);
    CHECK_THAT(out, Catch::Contains("already holds a run"));
  }
  {  // exporting against another anchor is refused
    fs::copy(dir / "anchor", dir / "anchor2", fs::copy_options::recursive);
    REQUIRE(RunCommand(o + " router-init --anchor " + dir / "anchor2" + " --data " + dir / "mine" + " --public --out " + dir / "anchor2/router_pub.safetensors", &out) == 0);
    CHECK(RunCommand(o + " export --run " + dir / "run" + " --anchor " + dir / "anchor2" + " --out " + dir / "x.safetensors" + " --owner a --name b", &out) == 1);
    CHECK_THAT(out, Catch::Contains("another anchor"));
    CHECK_FALSE(fs::exists(dir / "x.safetensors"));
  }
}

TEST_CASE("flexfed-owner refuses bad input with one line and a non-zero exit", "[owner_cli]") {
  TempDir dir;
  std::string out;
  const std::string o = absl::StrCat("FLEXFED_CACHE_DIR=", dir / "cache", " ", Owner());
  CHECK(RunCommand(o + " --help", &out) == 0);
  for (const char* cmd : {"router-init", "train", "eval", "audit", "export", "inspect"}) {
    CHECK(RunCommand(o + " " + cmd + " --help", &out) == 0);
    CHECK_THAT(out, Catch::Contains("Usage"));
  }
  CHECK(RunCommand(o + " frobnicate", &out) == 2);
  CHECK(RunCommand(o + " train --run " + dir / "r" + " --data /etc/hostname --steps 1", &out) == 1);
  CHECK_THAT(out, Catch::Contains("--anchor DIR is required"));
  CHECK(RunCommand(o + " train --pretrain test --run " + dir / "r" + " --steps 1", &out) == 1);
  CHECK_THAT(out, Catch::Contains("no training data"));
  REQUIRE(WriteFileAtomically(dir / "empty.txt", "").ok());
  CHECK(RunCommand(o + " train --pretrain test --data " + dir / "empty.txt" + " --run " + dir / "r2" + " --steps 1", &out) == 1);
  CHECK_THAT(out, Catch::Contains("holds no text"));
  REQUIRE(WriteFileAtomically(dir / "bad.txt", std::string("ok\xff\xfe", 4)).ok());
  CHECK(RunCommand(o + " train --pretrain test --data " + dir / "bad.txt" + " --run " + dir / "r3" + " --steps 1", &out) == 1);
  CHECK_THAT(out, Catch::Contains("invalid UTF-8 at byte 2"));
  CHECK(RunCommand(o + " train --pretrain huge --data " + dir / "bad.txt" + " --run " + dir / "r4" + " --steps 1", &out) == 1);
  CHECK_THAT(out, Catch::Contains("unknown model size 'huge'"));
  CHECK(RunCommand(o + " audit --model " + dir.path() + " --data /etc/hostname --out " + dir / "a", &out) == 1);
  CHECK_THAT(out, Catch::Contains("flexfed-owner audit: error:"));
  CHECK(RunCommand(o + " audit --data /etc/hostname", &out) == 1);
  CHECK_THAT(out, Catch::Contains("give --run RUN"));
  CHECK(RunCommand(o + " inspect /etc/hostname", &out) == 1);
  CHECK_THAT(out, Catch::Contains("/etc/hostname"));
  // Nothing half-written: failed runs leave no run folder behind.
  CHECK_FALSE(fs::exists(dir / "r2/train_config.json"));
}

}  // namespace
}  // namespace flexfed
