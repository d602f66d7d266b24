// Soak benchmark (issue #34): enrolled owners, each on its own connection and thread, push a
// module of fresh bytes for their expert and pull the whole current anchor, once per round, for
// --seconds. Every module must be accepted and every anchor file must arrive with its hash. One
// progress line per 10 s on stderr, one JSON line at the end. bench/run_soak.sh sets up the
// federation (anchor, owners, experts), runs this and samples the coordinator.
#include <CLI/CLI.hpp>

#include <atomic>
#include <cstring>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/client/coordinator_client.h"
#include "common/core/expert_module.h"
#include "common/core/file_util.h"
#include "common/core/model_config.h"
#include "common/core/safetensors.h"
#include <nlohmann/json.hpp>

using namespace flexfed;
namespace fs = std::filesystem;

namespace {

struct Owner {
  std::string id, identity_dir, expert_id;
};

// A module that passes validation against `config`: every allow-listed tensor (no bias), seeded
// normal values, in the anchor's dtype (F32 or BF16).
absl::Status WriteModule(const std::string& path, const ModelConfig& config, Dtype dtype, const std::string& anchor_id,
                         const Owner& owner, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<TensorInfo> infos;
  std::map<std::string, std::string> data;  // by name
  for (const AllowedTensor& a : ExpertModuleAllowList(config, dtype, /*with_bias=*/false)) {
    const float scale = a.shape.size() == 2 ? 0.02f : 1.0f;
    std::string bytes(*TensorByteSize(a.shape, a.dtype), '\0');
    const size_t size = DtypeSize(a.dtype);
    for (size_t i = 0; i < bytes.size() / size; ++i) {
      const float v = scale * normal(rng);
      // BF16 is the upper half of the F32 (little-endian: its bytes 2 and 3).
      std::memcpy(bytes.data() + i * size, reinterpret_cast<const char*>(&v) + (4 - size), size);
    }
    infos.push_back({a.name, a.dtype, a.shape, 0, 0});
    data[a.name] = std::move(bytes);
  }
  const std::string name = owner.expert_id.substr(owner.expert_id.find('/') + 1);
  std::map<std::string, std::string> meta = {
      {"format", kExpertModuleFormat}, {"format_version", kExpertModuleVersion}, {"anchor_sha256", anchor_id},
      {"config_hash", ConfigHash(config)}, {"owner", owner.id}, {"expert_name", name}, {"domain", "soak"},
      {"tokens_trained", "1000"}, {"router_init", "random"}};
  // The header puts the tensors in its own order; their bytes follow in that order.
  absl::StatusOr<std::string> file = BuildSafetensorsHeader(infos, meta);
  if (!file.ok()) return file.status();
  for (const TensorInfo& t : infos) *file += data.at(t.name);
  return WriteFileAtomically(path, *file);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"FlexFed soak benchmark: owners push modules and pull the anchor in rounds (one JSON line)"};
  std::string address, dir;
  std::vector<std::string> owner_args;
  int seconds = 60;
  double round_seconds = 1;
  app.add_option("--coordinator", address, "host:port")->required();
  app.add_option("--owner", owner_args, "OWNER_ID,IDENTITY_DIR,EXPERT_ID (repeat: one thread and connection each)")->required();
  app.add_option("--dir", dir, "Scratch folder")->required()->check(CLI::ExistingDirectory);
  app.add_option("--seconds", seconds, "How long to run")->check(CLI::Range(1, 7 * 86400));
  app.add_option("--round-seconds", round_seconds, "Each owner starts a round this often (0: back to back)")
      ->check(CLI::Range(0.0, 3600.0));
  CLI11_PARSE(app, argc, argv);
  std::vector<Owner> owners;
  for (const std::string& a : owner_args) {
    std::vector<std::string> f = absl::StrSplit(a, ',');
    if (f.size() != 3 || f[2].find('/') == std::string::npos) {
      std::cerr << "--owner " << a << ": expected OWNER_ID,IDENTITY_DIR,EXPERT_ID (expert ids are owner/name)\n";
      return 2;
    }
    owners.push_back({f[0], f[1], f[2]});
  }

  std::atomic<uint64_t> rounds{0}, bytes_up{0}, bytes_down{0};
  std::atomic<bool> failed{false};
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + std::chrono::seconds(seconds);
  auto run_owner = [&](size_t index) -> absl::Status {
    const Owner& o = owners[index];
    absl::StatusOr<ClientIdentity> id = ClientIdentity::Load(o.identity_dir);
    if (!id.ok()) return id.status();
    absl::StatusOr<std::unique_ptr<CoordinatorClient>> client = CoordinatorClient::Connect(address, *id);
    if (!client.ok()) return client.status();
    CoordinatorClient& c = **client;
    v1::Anchor anchor;
    {
      std::unique_ptr<grpc::ClientContext> ctx = c.NewContext();
      if (grpc::Status st = c.owner().GetAnchor(ctx.get(), v1::GetAnchorRequest(), &anchor); !st.ok()) {
        return absl::UnavailableError(absl::StrCat(o.id, ": GetAnchor: ", st.error_message()));
      }
    }
    const fs::path home = fs::path(dir) / o.id;
    fs::create_directories(home);
    if (absl::Status s = c.DownloadAnchorFiles(anchor, (home / "anchor").string(), nullptr); !s.ok()) return s;
    absl::StatusOr<std::string> text = ReadFile((home / "anchor" / "config.json").string());
    if (!text.ok()) return text.status();
    absl::StatusOr<ModelConfig> config = ModelConfig::FromJson(nlohmann::json::parse(*text), "config.json");
    if (!config.ok()) return config.status();
    if (config->torch_dtype != "float32" && config->torch_dtype != "bfloat16") {
      return absl::InvalidArgumentError(absl::StrCat("anchor dtype ", config->torch_dtype, ": the soak writes float32 or bfloat16 modules"));
    }
    const Dtype dtype = config->torch_dtype == "float32" ? Dtype::kF32 : Dtype::kBF16;
    uint64_t anchor_bytes = 0;
    for (const v1::AnchorFile& f : anchor.files()) anchor_bytes += f.blob().size();
    const std::string module = (home / "module.safetensors").string();
    auto next = std::chrono::steady_clock::now();
    for (uint64_t round = 1; std::chrono::steady_clock::now() < end && !failed; ++round) {
      if (absl::Status s = WriteModule(module, *config, dtype, anchor.anchor_id(), o, index * 1'000'003 + round); !s.ok()) return s;
      absl::StatusOr<v1::CommitUploadResponse> up = c.UploadFile(module, o.expert_id, nullptr);
      if (!up.ok()) return up.status();
      if (!up->rejection().empty()) {
        return absl::InternalError(absl::StrCat(o.id, " round ", round, ": module rejected: ", up->rejection(), ": ", up->message()));
      }
      bytes_up += fs::file_size(module);
      fs::remove_all(home / "anchor");  // a fresh pull each round, every file sent again
      if (absl::Status s = c.DownloadAnchorFiles(anchor, (home / "anchor").string(), nullptr); !s.ok()) return s;
      bytes_down += anchor_bytes;
      ++rounds;
      next += std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(round_seconds));
      std::this_thread::sleep_until(std::min(next, end));
    }
    return absl::OkStatus();
  };
  std::vector<std::thread> threads;
  for (size_t i = 0; i < owners.size(); ++i) {
    threads.emplace_back([&, i] {
      if (absl::Status s = run_owner(i); !s.ok()) {
        std::cerr << owners[i].id << ": " << s << "\n";
        failed = true;
      }
    });
  }
  std::thread progress([&] {
    while (!failed && std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(std::chrono::seconds(10));
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::cerr << nlohmann::json({{"t_s", static_cast<int>(t)}, {"rounds", rounds.load()}, {"up_mib", bytes_up / 1048576.0},
                                   {"down_mib", bytes_down / 1048576.0}})
                       .dump()
                << std::endl;
    }
  });
  for (std::thread& t : threads) t.join();
  progress.join();
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << nlohmann::json({{"owners", owners.size()}, {"seconds", t}, {"rounds", rounds.load()},
                               {"up_mib", bytes_up / 1048576.0}, {"down_mib", bytes_down / 1048576.0}, {"failed", failed.load()}})
                   .dump()
            << std::endl;
  return failed ? 1 : 0;
}
