// The federation as real processes on 127.0.0.1 with ports chosen by the OS: a coordinator,
// flexfedctl as the operator, flexfed-owner as two owners (docs/ARCHITECTURE.md §3; issue #4 tests).
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/core/model_config.h"
#include "common/core/anchor_manifest.h"
#include "common/model/anchor.h"
#include "common/merge/expert_export.h"
#include "absl/strings/str_format.h"
#include "common/client/coordinator_client.h"
#include "coordinator/blob_store.h"
#include "common/core/file_util.h"
#include "common/core/identity.h"
#include "common/core/sha256.h"
#include "tests/test_util.h"
#include <nlohmann/json.hpp>

extern char** environ;

namespace flexfed {
namespace {

using testing::BinaryFromEnv;
using testing::RunCommand;
using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

// A coordinator process; killed (SIGKILL) when the object dies unless stopped before.
class CoordinatorProcess {
 public:
  CoordinatorProcess(const std::string& ca_dir, const std::string& data_dir, const std::string& port_file)
      : ca_dir_(ca_dir), data_dir_(data_dir), port_file_(port_file) {
    Start();
  }
  ~CoordinatorProcess() { Kill(); }
  void Start() {
    fs::remove(port_file_);
    std::vector<std::string> args = {BinaryFromEnv("FLEXFED_COORDINATOR_BIN"), "--ca-dir", ca_dir_, "--data-dir", data_dir_,
                                     "--listen", "127.0.0.1:" + (port_ ? std::to_string(port_) : std::string("0")),
                                     "--port-file", port_file_, "--metrics-listen", "127.0.0.1:0"};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    REQUIRE(posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ) == 0);
    // Wait for the port file (the server writes it once it serves), at most 20 s.
    for (int i = 0; i < 400 && !fs::exists(port_file_); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    REQUIRE(fs::exists(port_file_));
    const std::string ports = *ReadFile(port_file_);
    port_ = std::stoi(ports);
    metrics_port_ = std::stoi(ports.substr(ports.find('\n') + 1));
  }
  // GET http://127.0.0.1:<metrics port><path>, through Debian's python3.
  std::string Http(const std::string& path) const {
    std::string body;
    RunCommand(absl::StrCat("/usr/bin/python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:",
                            metrics_port_, path, "', timeout=10).read().decode())\""), &body);
    return body;
  }
  void Kill() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = 0;
    }
  }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  int metrics_port() const { return metrics_port_; }

 private:
  std::string ca_dir_, data_dir_, port_file_;
  pid_t pid_ = 0;
  int port_ = 0, metrics_port_ = 0;
};

struct Federation {
  TempDir dir;
  std::string ctl = BinaryFromEnv("FLEXFED_CTL"), owner = BinaryFromEnv("FLEXFED_OWNER");
  std::string fingerprint;
  std::unique_ptr<CoordinatorProcess> coordinator;
  std::string out;

  // Without `tokenizer_dir`: a `test` model (byte tokenizer) pretrained for a few steps. With it: an
  // OLMo-2-shaped `small` model with random fp32 weights carrying that folder's tokenizer.json, its
  // vocabulary padded to 1024 rows as OLMo-2 pads its tokenizer's to 100352. Either way with r_pub.
  // `random_args` choose the random anchor's size and dtype; `public_init_args` limit r_pub's sample.
  explicit Federation(const std::string& tokenizer_dir = "",
                      const std::string& random_args = "--size small --vocab-size 1024 --dtype float32",
                      const std::string& public_init_args = "") {
    REQUIRE(RunCommand(ctl + " ca init --dir " + dir / "ca", &out) == 0);
    fingerprint = out.substr(out.find("pin it): ") + 9, 64);
    coordinator = std::make_unique<CoordinatorProcess>(dir / "ca", dir / "data", dir / "port");
    const std::string text = dir / "public.txt";
    std::string words;
    for (int i = 0; i < 3000; ++i) words += absl::StrCat("word", i % 37, i % 11 == 0 ? ".\n" : " ");
    REQUIRE(WriteFileAtomically(text, words).ok());
    const std::string cache = "FLEXFED_CACHE_DIR=" + dir / "cache";
    if (tokenizer_dir.empty()) {
      REQUIRE(RunCommand(cache + " " + owner + " train --pretrain test --data " + text + " --run " + dir / "anchor_run" +
                             " --steps 3 --seq-len 32 --batch-size 2 --warmup 1 --val-every 0 --validation-fraction 0 --plain",
                         &out) == 0);
      fs::copy(dir / "anchor_run/model", dir / "anchor");
    } else {
      REQUIRE(RunCommand(ctl + " random-checkpoint " + random_args + " --seed 5 --tokenizer " + tokenizer_dir + " --out " +
                             dir / "anchor", &out) == 0);
    }
    REQUIRE(RunCommand(cache + " " + owner + " router-init --public --anchor " + dir / "anchor" + " --data " + text + " --out " +
                           dir / "anchor/router_pub.safetensors " + public_init_args, &out) == 0);
    REQUIRE(Admin("anchor publish " + dir / "anchor") == 0);
  }
  int Admin(const std::string& args) {
    return RunCommand(ctl + " " + args + " --coordinator " + coordinator->address() + " --identity " + dir / "ca/admin", &out);
  }
  int Owner(const std::string& id, const std::string& args) {
    return RunCommand(absl::StrCat("FLEXFED_CACHE_DIR=", dir / "cache", " ", owner, " ", args, " --coordinator ",
                                   coordinator->address(), " --identity ", dir / id),
                      &out);
  }
  // Adds, enrolls and registers `id` with an expert `id/x`; pulls the anchor to DIR/<id>_anchor.
  void Join(const std::string& id) {
    REQUIRE(Admin("owner add " + id + " --json") == 0);
    const std::string token = nlohmann::json::parse(out)["token"];
    REQUIRE(RunCommand(absl::StrCat(owner, " enroll --owner ", id, " --token ", token, " --ca-cert ", dir / "ca/ca.crt",
                                    " --ca-fingerprint ", fingerprint, " --coordinator ", coordinator->address(),
                                    " --identity ", dir / id), &out) == 0);
    REQUIRE(Admin("expert register --owner " + id + " --name x --domain test") == 0);
    REQUIRE(Owner(id, "pull --to " + dir / (id + "_anchor")) == 0);
  }
  // A module for `id`: the anchor's FFN, lightly trained.
  std::string Module(const std::string& id) {
    const std::string anchor = dir / (id + "_anchor");
    const std::string data = dir / (id + ".txt");
    std::string text;
    for (int i = 0; i < 2000; ++i) text += absl::StrCat(id, " ", i * 7 % 101, "\n");
    REQUIRE(WriteFileAtomically(data, text).ok());
    const std::string cache = "FLEXFED_CACHE_DIR=" + dir / "cache ";
    REQUIRE(RunCommand(cache + owner + " router-init --anchor " + anchor + " --data " + data + " --out " + dir / (id + "_r.safetensors"), &out) == 0);
    REQUIRE(RunCommand(cache + owner + " train --anchor " + anchor + " --router-init " + dir / (id + "_r.safetensors") + " --data " + data +
                           " --run " + dir / (id + "_run") + " --steps 2 --seq-len 32 --batch-size 2 --warmup 1 --val-every 0 --plain", &out) == 0);
    REQUIRE(RunCommand(owner + " export --run " + dir / (id + "_run") + " --anchor " + anchor + " --out " + dir / (id + ".module") +
                           " --owner " + id + " --name x", &out) == 0);
    return dir / (id + ".module");
  }
};

TEST_CASE("two owners enroll over mTLS, pull, push; the operator lists and enables their experts", "[federation]") {
  Federation f;
  f.Join("acme");
  f.Join("beta");
  for (const char* id : {"acme", "beta"}) {
    const std::string module = f.Module(id);
    REQUIRE(f.Owner(id, absl::StrCat("push ", module, " --expert ", id, "/x --anchor ", f.dir / (std::string(id) + "_anchor"))) == 0);
    CHECK_THAT(f.out, Catch::Contains("uploaded"));
  }
  REQUIRE(f.Admin("expert list --json") == 0);
  nlohmann::json experts = nlohmann::json::parse(f.out);
  REQUIRE(experts.size() == 2);
  for (const auto& e : experts) {
    CHECK(e["state"] == "uploaded");
    CHECK(e["module_sha256"].get<std::string>() == *Sha256File(f.dir / (e["owner"].get<std::string>() + ".module")));
  }
  REQUIRE(f.Admin("expert enable acme/x") == 0);
  REQUIRE(f.Admin("expert list --json") == 0);
  CHECK(nlohmann::json::parse(f.out)[0]["state"] == "active");
  REQUIRE(f.Admin("audit tail -n 100") == 0);
  CHECK_THAT(f.out, Catch::Contains("upload.commit") && Catch::Contains("expert.active"));
  REQUIRE(f.Owner("acme", "status --expert acme/x --json") == 0);
  CHECK_THAT(f.out, Catch::Contains("EXPERT_STATE_ACTIVE"));
  // Operations: metrics and health.
  const std::string metrics = f.coordinator->Http("/metrics");
  CHECK_THAT(metrics, Catch::Contains("flexfed_uploads_committed_total 2"));
  CHECK_THAT(metrics, Catch::Contains("flexfed_experts{state=\"active\"} 1"));
  CHECK_THAT(metrics, Catch::Contains("flexfed_certificate_expiry_seconds{subject=\"owner/beta\"}"));
  CHECK_THAT(f.coordinator->Http("/health"), Catch::Contains("flexfed_up 1"));
  // The store check on demand (issue #13), against the running coordinator: clean; then with what a
  // crash leaves planted in its data directory, reported (exit 1) and, when asked, repaired.
  REQUIRE(f.Admin("status --check --json") == 0);
  nlohmann::json check = nlohmann::json::parse(f.out);
  CHECK(check["unrepaired"] == 0);
  CHECK(check["findings"].empty());
  CHECK(check["blobs"].get<int>() >= 5);  // the anchor's files and two modules
  CHECK(check["bytes_hashed"].get<int64_t>() > 0);
  const fs::path store = fs::path(f.dir / "data") / "store";
  fs::create_directories(store / "uploads" / std::string(32, 'a'));
  const std::string garbage = "a blob nothing refers to";
  const std::string garbage_sha = Sha256Hex(garbage);  // stored under its own name, never recorded
  fs::create_directories(store / "blobs" / garbage_sha.substr(0, 2) / garbage_sha.substr(2, 2));
  REQUIRE(WriteFileAtomically((store / "blobs" / garbage_sha.substr(0, 2) / garbage_sha.substr(2, 2) / garbage_sha).string(), garbage).ok());
  CHECK(f.Admin("status --check --no-repair") == 1);
  CHECK_THAT(f.out, Catch::Contains("PROBLEM   stray_session " + std::string(32, 'a')));
  CHECK_THAT(f.out, Catch::Contains("2 problem(s) left"));
  CHECK_THAT(f.coordinator->Http("/metrics"), Catch::Contains("flexfed_store_problems 2"));
  REQUIRE(f.Admin("status --check") == 0);
  CHECK_THAT(f.out, Catch::Contains("repaired  unreferenced_blob " + garbage_sha));
  CHECK_FALSE(fs::exists(store / "uploads" / std::string(32, 'a')));
  REQUIRE(f.Admin("status --check --skip-hashes --json") == 0);
  CHECK(nlohmann::json::parse(f.out)["findings"].empty());
  CHECK(f.Admin("status --no-repair") == 2);  // goes with --check

  // Releases from the operator's CLI: build, list, show, export; then local inference on the export.
  REQUIRE(f.Admin("expert enable beta/x") == 0);
  REQUIRE(f.Admin("release build --k 2 --note first --json") == 0);
  const nlohmann::json rel = nlohmann::json::parse(f.out);
  CHECK(rel["release_id"] == "rel-0001");
  CHECK(rel["num_experts"] == 3);
  CHECK(rel["experts"][0]["expert_id"] == "acme/x");
  REQUIRE(f.Admin("release build --exclude acme/x") == 0);
  CHECK_THAT(f.out, Catch::Contains("rel-0002") && Catch::Contains("excluded: acme/x"));
  CHECK(f.Admin("release build --k 9") == 1);
  CHECK_THAT(f.out, Catch::Contains("outside 1..3"));
  REQUIRE(f.Admin("release list --json") == 0);
  CHECK(nlohmann::json::parse(f.out).size() == 2);
  REQUIRE(f.Admin("release export rel-0001 " + f.dir / "rel1") == 0);  // downloads the anchor too
  const nlohmann::json exported = nlohmann::json::parse(testing::ValueOrDie(ReadFile(f.dir / "rel1/flexfed_release.json")));
  CHECK(exported == rel);
  CHECK_FALSE(fs::exists(f.dir / "rel1.parts"));
  CHECK(f.Admin("release export rel-0001 " + f.dir / "rel1") == 1);  // never overwrites
  CHECK_THAT(f.out, Catch::Contains("already exists"));
  REQUIRE(f.Admin("release export rel-0002 " + f.dir / "rel2 --anchor " + f.dir / "anchor") == 0);
  const std::string ctl = f.ctl;
  std::string out;
  REQUIRE(RunCommand(ctl + " eval " + f.dir / "rel1" + " --data t=" + f.dir / "acme.txt" + " --seq-len 16 --exclude 1 --json " +
                         "--cache-dir " + f.dir / "cache", &out) == 0);
  const double opted_out = nlohmann::json::parse(out)["results"][0]["bits_per_byte"];
  REQUIRE(RunCommand(ctl + " eval " + f.dir / "rel2" + " --data t=" + f.dir / "acme.txt" + " --seq-len 16 --json --cache-dir " +
                         f.dir / "cache", &out) == 0);
  CHECK(std::abs(opted_out - nlohmann::json::parse(out)["results"][0]["bits_per_byte"].get<double>()) < 1e-5);
  REQUIRE(RunCommand(ctl + " generate " + f.dir / "rel1" + " --prompt acme --max-new-tokens 5 --json", &out) == 0);
  CHECK(nlohmann::json::parse(out)["tokens"].size() <= 5);
  REQUIRE(RunCommand(ctl + " routing " + f.dir / "rel1" + " --text acme --json", &out) == 0);
  CHECK(nlohmann::json::parse(out)["tokens"].size() == 4);
  // The export is a Hugging Face checkpoint as it is: transformers' AutoModelForCausalLM loads it and
  // computes flexfedctl's logits. The owners' negative router biases are FlexFed's own extra, in
  // flexfed_extras.safetensors, which transformers does not read; so flexfedctl runs on the same
  // files without that one (docs/CHECKPOINTS.md).
  fs::create_directory(f.dir / "rel1_hf");
  for (const auto& entry : fs::directory_iterator(f.dir / "rel1")) {
    if (entry.path().filename() != "flexfed_extras.safetensors") {
      fs::create_symlink(entry.path(), fs::path(f.dir / "rel1_hf") / entry.path().filename());
    }
  }
  REQUIRE(RunCommand(ctl + " logits " + f.dir / "rel1_hf" + " --ids 97,99,109,101,32,120 --ids 98,101 -o " +
                         f.dir / "rel1.logits.safetensors", &out) == 0);
  {
    const int hf = RunCommand(testing::BinaryFromEnv("FLEXFED_HF_RELEASE_CHECK") + " " + f.dir / "rel1" + " " +
                                  f.dir / "rel1.logits.safetensors", &out);
    INFO(out);
    CHECK(hf == 0);
    CHECK_THAT(out, Catch::Contains("FlexOlmoForCausalLM (flex_olmo, 3 experts)"));
  }
  CHECK(RunCommand(ctl + " generate " + f.dir / "rel1" + " --prompt acme --exclude 7", &out) == 1);
  CHECK_THAT(out, Catch::Contains("expert"));
}

// Issue #13, row 13: one idle TCP connection blocked the metrics endpoint for 30 s (one worker).
TEST_CASE("idle connections do not block the metrics and health endpoints", "[federation]") {
  TempDir dir;
  std::string out;
  REQUIRE(RunCommand(BinaryFromEnv("FLEXFED_CTL") + " ca init --dir " + dir / "ca", &out) == 0);
  CoordinatorProcess coordinator(dir / "ca", dir / "data", dir / "port");
  std::vector<int> idle;
  for (int i = 0; i < 2; ++i) {  // connected, sending nothing
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(coordinator.metrics_port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    idle.push_back(fd);
  }
  // Answered while they sit there (Http gives up after 10 s; civetweb's default wait was 30 s).
  CHECK_THAT(coordinator.Http("/health"), Catch::Contains("flexfed_up 1"));
  CHECK_THAT(coordinator.Http("/metrics"), Catch::Contains("flexfed_"));
  for (int fd : idle) ::close(fd);
}

TEST_CASE("an owner trains, evaluates, exports and pushes against an OLMo-2-shaped anchor with a tokenizer.json", "[federation]") {
  const std::string tokenizer_dir = (fs::path(testing::BinaryFromEnv("FLEXFED_TOKENIZER_ORACLE_DIR")) / "dolma2").string();
  Federation f(tokenizer_dir);
  f.Join("acme");
  // `pull` brings the anchor's tokenizer files with it.
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    CHECK(ReadFile(f.dir / "acme_anchor/" + name).value() == ReadFile(tokenizer_dir + "/" + name).value());
  }
  const std::string module = f.Module("acme");  // router-init, train, export
  REQUIRE(RunCommand(absl::StrCat("FLEXFED_CACHE_DIR=", f.dir / "cache", " ", f.owner, " eval ", f.dir / "acme_run/model",
                                  " --data ", f.dir / "acme.txt", " --seq-len 32 --max-sequences 4 --json"), &f.out) == 0);
  const nlohmann::json eval = nlohmann::json::parse(f.out);
  CHECK(eval["bits_per_byte"].get<double>() > 0);
  REQUIRE(f.Owner("acme", absl::StrCat("push ", module, " --expert acme/x --anchor ", f.dir / "acme_anchor")) == 0);
  CHECK_THAT(f.out, Catch::Contains("uploaded"));
  REQUIRE(f.Admin("expert enable acme/x") == 0);
  REQUIRE(f.Admin("release build --json") == 0);
  REQUIRE(f.Admin(absl::StrCat("release export rel-0001 ", f.dir / "rel --held-out ", f.dir / "acme.txt",
                               " --held-out-seq-len 32 --held-out-sequences 4")) == 0);
  CHECK_THAT(f.out, Catch::Contains("not exact") && Catch::Contains("bits/byte where FlexFed scores"));
  CHECK(ReadFile(f.dir / "rel/tokenizer.json").value() == ReadFile(tokenizer_dir + "/tokenizer.json").value());
  // transformers alone, on the release without FlexFed's extras file: AutoTokenizer gives FlexFed's
  // ids and AutoModelForCausalLM its logits.
  fs::create_directory(f.dir / "rel_hf");
  for (const auto& entry : fs::directory_iterator(f.dir / "rel")) {
    if (entry.path().filename() != "flexfed_extras.safetensors") {
      fs::create_symlink(entry.path(), fs::path(f.dir / "rel_hf") / entry.path().filename());
    }
  }
  std::string out;
  REQUIRE(RunCommand(f.ctl + " logits " + f.dir / "rel_hf" + " --text 'acme 42' --text '東京 🇯🇵 naïve, שלום' -o " +
                         f.dir / "rel.logits.safetensors", &out) == 0);
  const int hf = RunCommand(testing::BinaryFromEnv("FLEXFED_HF_RELEASE_CHECK") + " " + f.dir / "rel_hf" + " " +
                                f.dir / "rel.logits.safetensors", &out);
  INFO(out);
  CHECK(hf == 0);
  CHECK_THAT(out, Catch::Contains("2 of 2 texts tokenised as FlexFed did") &&
                      Catch::Contains("FlexOlmoForCausalLM (flex_olmo, 2 experts)"));
}

// One federation, the refusals in turn (each block leaves the others' preconditions intact; the
// revocation comes last but one on purpose).
TEST_CASE("the coordinator refuses callers it cannot trust", "[federation]") {
  Federation f;
  f.Join("acme");
  f.Join("beta");
  const std::string module = f.Module("acme");
  {  // an owner cannot write another owner's expert
    CHECK(f.Owner("beta", absl::StrCat("push ", module, " --expert acme/x --anchor ", f.dir / "beta_anchor")) == 1);
    CHECK_THAT(f.out, Catch::Contains("belongs to another owner"));
  }
  {  // an owner cannot call admin RPCs
    CHECK(RunCommand(f.ctl + " expert list --coordinator " + f.coordinator->address() + " --identity " + f.dir / "acme", &f.out) == 1);
    CHECK_THAT(f.out, Catch::Contains("for operators"));
  }
  {  // no client certificate
    fs::create_directories(f.dir / "nobody");
    fs::copy(f.dir / "ca/ca.crt", f.dir / "nobody/ca.crt");
    absl::StatusOr<std::unique_ptr<CoordinatorClient>> c =
        CoordinatorClient::Connect(f.coordinator->address(), *ClientIdentity::Load(f.dir / "nobody"));
    REQUIRE(c.ok());
    v1::Anchor a;
    auto ctx = (*c)->NewContext();
    absl::Status s = ToStatus((*c)->owner().GetAnchor(ctx.get(), v1::GetAnchorRequest(), &a));
    CHECK(absl::IsUnauthenticated(s));
    CHECK_THAT(std::string(s.message()), Catch::Contains("enroll first"));
  }
  {  // a certificate from another CA
    REQUIRE(RunCommand(f.ctl + " ca init --dir " + f.dir / "other_ca", &f.out) == 0);
    // Trust the real server, present a client certificate from the other CA: the handshake fails.
    fs::create_directories(f.dir / "forger");
    fs::copy(f.dir / "ca/ca.crt", f.dir / "forger/ca.crt");
    fs::copy(f.dir / "other_ca/admin/client.crt", f.dir / "forger/client.crt");
    fs::copy(f.dir / "other_ca/admin/client.key", f.dir / "forger/client.key");
    CHECK(RunCommand(f.ctl + " status --coordinator " + f.coordinator->address() + " --identity " + f.dir / "forger", &f.out) == 1);
  }
  {  // a revoked owner
    REQUIRE(f.Admin("owner revoke acme --reason test") == 0);
    CHECK(f.Owner("acme", "status --expert acme/x") == 1);
    CHECK_THAT(f.out, Catch::Contains("revoked"));
    CHECK(f.Owner("beta", "status --expert beta/x") == 0);
    // Re-enrolled by the operator: a new token, a new identity; the old one stays refused.
    REQUIRE(f.Admin("owner reenroll acme --json") == 0);
    const std::string token = nlohmann::json::parse(f.out)["token"];
    REQUIRE(RunCommand(absl::StrCat(f.owner, " enroll --owner acme --token ", token, " --ca-cert ", f.dir / "ca/ca.crt",
                                    " --ca-fingerprint ", f.fingerprint, " --coordinator ", f.coordinator->address(),
                                    " --identity ", f.dir / "acme2"), &f.out) == 0);
    CHECK(f.Owner("acme2", "status --expert acme/x") == 0);
    CHECK(f.Owner("acme", "status --expert acme/x") == 1);
  }
  {  // a reused enrollment token
    REQUIRE(f.Admin("owner add gamma --json") == 0);
    const std::string token = nlohmann::json::parse(f.out)["token"];
    const std::string enroll = absl::StrCat(f.owner, " enroll --owner gamma --token ", token, " --ca-cert ", f.dir / "ca/ca.crt",
                                            " --ca-fingerprint ", f.fingerprint, " --coordinator ", f.coordinator->address(), " --identity ");
    REQUIRE(RunCommand(enroll + f.dir / "gamma", &f.out) == 0);
    CHECK(RunCommand(enroll + f.dir / "gamma2", &f.out) == 1);
    CHECK_THAT(f.out, Catch::Contains("already used"));
  }
  {  // a CA that does not match the pinned fingerprint
    REQUIRE(f.Admin("owner add delta --json") == 0);
    const std::string token = nlohmann::json::parse(f.out)["token"];
    CHECK(RunCommand(absl::StrCat(f.owner, " enroll --owner delta --token ", token, " --ca-cert ", f.dir / "ca/ca.crt",
                                  " --ca-fingerprint ", std::string(64, '0'), " --coordinator ", f.coordinator->address(),
                                  " --identity ", f.dir / "delta"), &f.out) == 1);
    CHECK_THAT(f.out, Catch::Contains("do not enroll"));
    CHECK_FALSE(fs::exists(f.dir / "delta/client.key"));
  }
}

// Issue #13 as it was found: an enrolled owner's own gRPC client sending raw calls to the
// coordinator process on loopback (rows 1, 2, 3, 4, 6 and 12; the in-process tests reproduce the
// races deterministically). Each block failed on the code before the fix.
TEST_CASE("a hostile owner's raw calls against the coordinator process are refused", "[federation]") {
  Federation f;
  f.Join("acme");
  const std::string module = f.Module("acme");
  REQUIRE(f.Owner("acme", absl::StrCat("push ", module, " --expert acme/x --anchor ", f.dir / "acme_anchor")) == 0);
  const std::string admin_id = ValueOrDie(ReadIdentity(ValueOrDie(ReadFile(f.dir / "ca/admin/client.crt")))).id;
  f.Join(admin_id);  // an owner named like the operator (owner ids are the operator's choice)
  auto mallory = ValueOrDie(CoordinatorClient::Connect(f.coordinator->address(), ValueOrDie(ClientIdentity::Load(f.dir / admin_id))));
  auto operator_client = ValueOrDie(CoordinatorClient::Connect(f.coordinator->address(), ValueOrDie(ClientIdentity::Load(f.dir / "ca/admin"))));
  auto status_of = [](const grpc::Status& s) { return ToStatus(s); };

  {  // row 1: claiming acme's module by its hash, without its bytes
    ChunkLayout layout = ValueOrDie(LayoutOfFile(module, kDefaultChunkSize));
    v1::BeginUploadRequest begin;
    begin.set_expert_id(admin_id + "/x");
    begin.mutable_manifest()->mutable_blob()->set_sha256(layout.sha256);
    begin.mutable_manifest()->mutable_blob()->set_size(layout.size);
    begin.mutable_manifest()->set_chunk_size(layout.chunk_size);
    for (uint64_t i = 0; i < layout.chunk_sha256.size(); ++i) {
      v1::ChunkInfo* c = begin.mutable_manifest()->add_chunks();
      c->set_index(i);
      c->set_sha256(layout.chunk_sha256[i]);
      c->set_size(layout.ChunkBytes(i));
    }
    v1::UploadStatus st;
    auto ctx = mallory->NewContext();
    REQUIRE(mallory->owner().BeginUpload(ctx.get(), begin, &st).ok());
    CHECK(st.missing_size() == static_cast<int>(layout.chunk_sha256.size()));  // every chunk, though the blob is stored
    v1::CommitUploadRequest commit;
    commit.set_session_id(st.session_id());
    v1::CommitUploadResponse committed;
    ctx = mallory->NewContext();
    CHECK(absl::IsFailedPrecondition(status_of(mallory->owner().CommitUpload(ctx.get(), commit, &committed))));
    REQUIRE(f.Admin("expert list --json") == 0);
    for (const auto& e : nlohmann::json::parse(f.out)) {
      if (e["expert_id"] == admin_id + "/x") CHECK(e["state"] == "registered");
    }
    // ... nor learn that it exists: the same answer as for no blob at all.
    v1::GetManifestRequest get;
    v1::Manifest m;
    get.set_sha256(layout.sha256);
    ctx = mallory->NewContext();
    const absl::Status theirs = status_of(mallory->owner().GetManifest(ctx.get(), get, &m));
    get.set_sha256(std::string(64, 'd'));
    ctx = mallory->NewContext();
    const absl::Status none = status_of(mallory->owner().GetManifest(ctx.get(), get, &m));
    CHECK(absl::IsNotFound(theirs));
    CHECK(theirs.code() == none.code());
  }
  {  // rows 2 and 3: the operator's blob sessions and blob stream, by an owner with the operator's id
    const std::string config_sha = ValueOrDie(Sha256File(f.dir / "anchor/config.json"));
    const std::string session = Sha256Hex(absl::StrCat("admin\n", admin_id, "\n\n", config_sha)).substr(0, 32);
    v1::QueryMissingRequest q;
    q.set_session_id(session);
    v1::UploadStatus st;
    auto ctx = operator_client->NewContext();
    REQUIRE(operator_client->owner().QueryMissing(ctx.get(), q, &st).ok());  // the session is real
    ctx = mallory->NewContext();
    CHECK(absl::IsPermissionDenied(status_of(mallory->owner().QueryMissing(ctx.get(), q, &st))));
    v1::CommitUploadRequest commit;
    commit.set_session_id(session);
    v1::CommitUploadResponse committed;
    ctx = mallory->NewContext();
    CHECK(absl::IsPermissionDenied(status_of(mallory->owner().CommitUpload(ctx.get(), commit, &committed))));
    ctx = mallory->NewContext();
    auto writer = mallory->admin().UploadBlobChunks(ctx.get(), &st);
    v1::UploadChunk chunk;
    chunk.set_session_id(session);
    chunk.set_data("{}");
    writer->Write(chunk);
    writer->WritesDone();
    CHECK(absl::IsPermissionDenied(status_of(writer->Finish())));
  }
  {  // row 4: one token, twelve enrollments at once: one certificate
    REQUIRE(f.Admin("owner add gamma --json") == 0);
    const std::string token = nlohmann::json::parse(f.out)["token"];
    std::atomic<int> enrolled{0};
    std::vector<std::thread> racers;
    for (int i = 0; i < 12; ++i) {
      racers.emplace_back([&] {
        KeyAndCsr key = ValueOrDie(MakeKeyAndCsr("gamma"));
        v1::EnrollRequest r;
        r.set_owner_id("gamma");
        r.set_token(token);
        r.set_csr_pem(key.csr_pem);
        v1::EnrollResponse out;
        auto ctx = mallory->NewContext();
        if (mallory->enrollment().Enroll(ctx.get(), r, &out).ok()) ++enrolled;
      });
    }
    for (std::thread& t : racers) t.join();
    CHECK(enrolled == 1);
    REQUIRE(f.Admin("audit tail -n 100") == 0);
    int ok_events = 0;
    std::istringstream lines(f.out);
    for (std::string line; std::getline(lines, line);) {
      const nlohmann::json event = nlohmann::json::parse(line, nullptr, false);
      if (event.is_object() && event.value("action", "") == "owner.enroll" && event.value("result", "") == "ok" &&
          event["objects"].value("owner", "") == "gamma") {
        ++ok_events;
      }
    }
    CHECK(ok_events == 1);
  }
  {  // row 6: a 2 MiB owner id is refused before it reaches the audit log, which stays readable
    const uintmax_t audit_before = fs::file_size(f.dir / "data/audit.jsonl");
    for (int i = 0; i < 9; ++i) {
      v1::EnrollRequest r;
      r.set_owner_id(std::string(2 << 20, 'x'));
      r.set_token("t");
      r.set_csr_pem("c");
      v1::EnrollResponse out;
      auto ctx = mallory->NewContext();
      CHECK(absl::IsPermissionDenied(status_of(mallory->enrollment().Enroll(ctx.get(), r, &out))));
    }
    CHECK(fs::file_size(f.dir / "data/audit.jsonl") - audit_before < 9 * 1024);
    CHECK(f.Admin("audit tail -n 1000") == 0);
  }
  {  // row 12: a blob of 2^64 - 1 bytes in no chunks
    v1::Manifest m;
    m.mutable_blob()->set_sha256(std::string(64, 'e'));
    m.mutable_blob()->set_size(~0ull);
    m.set_chunk_size(kDefaultChunkSize);
    v1::UploadStatus st;
    auto ctx = operator_client->NewContext();
    CHECK(absl::IsInvalidArgument(status_of(operator_client->admin().BeginBlobUpload(ctx.get(), m, &st))));
  }
  REQUIRE(f.Admin("status --check --json") == 0);  // and the store is as it should be
  CHECK(nlohmann::json::parse(f.out)["findings"].empty());
}

TEST_CASE("kill -9 of the coordinator mid-upload: the upload resumes with only the missing chunks", "[federation]") {
  Federation f;
  f.Join("acme");
  // The `test` model's module fits one 4 MiB chunk, so this uploads a 9 MiB blob as the operator:
  // the same transfer path (sessions, chunks, commit); chunk-level resume is what is under test.
  std::string big(9 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 2654435761u >> 13);
  REQUIRE(WriteFileAtomically(f.dir / "big.bin", big).ok());
  absl::StatusOr<std::unique_ptr<CoordinatorClient>> c =
      CoordinatorClient::Connect(f.coordinator->address(), *ClientIdentity::Load(f.dir / "ca/admin"));
  REQUIRE(c.ok());
  // Send the first chunk only, as a client that crashed would have.
  ChunkLayout layout = *LayoutOfFile(f.dir / "big.bin", 4 << 20);
  REQUIRE(layout.chunk_sha256.size() == 3);
  v1::Manifest m;
  m.mutable_blob()->set_sha256(layout.sha256);
  m.mutable_blob()->set_size(layout.size);
  m.set_chunk_size(layout.chunk_size);
  for (uint64_t i = 0; i < 3; ++i) {
    m.add_chunks()->set_sha256(layout.chunk_sha256[i]);
    m.mutable_chunks(static_cast<int>(i))->set_size(layout.ChunkBytes(i));
  }
  v1::UploadStatus status;
  {
    auto ctx = (*c)->NewContext();
    REQUIRE((*c)->admin().BeginBlobUpload(ctx.get(), m, &status).ok());
    CHECK(status.missing_size() == 3);
    auto stream_ctx = (*c)->NewContext();
    v1::UploadStatus reply;
    auto writer = (*c)->admin().UploadBlobChunks(stream_ctx.get(), &reply);
    v1::UploadChunk chunk;
    chunk.set_session_id(status.session_id());
    chunk.set_index(0);
    chunk.set_data(big.substr(0, 4 << 20));
    chunk.set_sha256(layout.chunk_sha256[0]);
    REQUIRE(writer->Write(chunk));
    writer->WritesDone();
    REQUIRE(writer->Finish().ok());
  }
  // kill -9 and restart on the same data directory and port.
  f.coordinator->Kill();
  f.coordinator->Start();
  // The full client now sends only what is missing, and the blob is exact.
  std::FILE* log = std::tmpfile();
  ProgressReporter progress(log, /*plain=*/true);
  absl::StatusOr<std::unique_ptr<CoordinatorClient>> again =
      CoordinatorClient::Connect(f.coordinator->address(), *ClientIdentity::Load(f.dir / "ca/admin"));
  absl::StatusOr<v1::CommitUploadResponse> done = (*again)->UploadFile(f.dir / "big.bin", "", &progress);
  REQUIRE(done.ok());
  CHECK(done->blob().sha256() == layout.sha256);
  std::rewind(log);
  std::string printed(1 << 16, '\0');
  printed.resize(std::fread(printed.data(), 1, printed.size(), log));
  std::fclose(log);
  CHECK_THAT(printed, Catch::Contains("resuming: 1 of 3 chunks already at the coordinator"));
  CHECK(*Sha256File(f.dir / ("data/store/blobs/" + layout.sha256.substr(0, 2) + "/" + layout.sha256.substr(2, 2) + "/" + layout.sha256)) == layout.sha256);
  REQUIRE(f.Admin("upload list --json") == 0);
  bool found = false;
  for (const auto& u : nlohmann::json::parse(f.out)) {
    if (u["sha256"] == layout.sha256) {
      found = true;
      CHECK(u["state"] == "committed");
    }
  }
  CHECK(found);
}

// Real sizes (issue #12), in the slow suite: each step as its own process, timed, with its peak
// resident memory, printed as a table for docs/PERFORMANCE.md. Memory bounds are asserted where
// streaming promises them (export, merge, push, pull: not the model's size).
class Steps {
 public:
  explicit Steps(std::string title) : title_(std::move(title)) {}
  ~Steps() {
    std::string table = "\n" + title_ + "\n" + absl::StrFormat("  %-52s %9s %12s\n", "step", "seconds", "peak RSS GB");
    for (const auto& [name, m] : rows_) table += absl::StrFormat("  %-52s %9.1f %12.2f\n", name, m.seconds, m.max_rss_bytes / 1e9);
    std::cout << table << std::flush;
  }
  testing::Measured Run(const std::string& name, const std::string& command) {
    std::string out;
    testing::Measured m = testing::RunMeasured(command, &out);
    INFO(name << ": " << out);
    REQUIRE(m.status == 0);
    rows_.emplace_back(name, m);
    return m;
  }
  void Add(const std::string& name, double seconds, int64_t peak) { rows_.push_back({name, {0, seconds, peak}}); }

 private:
  std::string title_;
  std::vector<std::pair<std::string, testing::Measured>> rows_;
};

TEST_CASE("an owner's whole workflow on a 1B-shaped anchor with a tokenizer.json, on the CPU", "[real_size][slow]") {
  const std::string tokenizer_dir = (fs::path(BinaryFromEnv("FLEXFED_TOKENIZER_ORACLE_DIR")) / "dolma2").string();
  Steps steps("1B shape (hidden 2048, 16 layers, vocabulary 100352, bf16 anchor of 2.97 GB), CPU:");
  Federation f(tokenizer_dir, "--size 1b", "--samples 1 --max-tokens 64");
  REQUIRE(f.Admin("owner add acme --json") == 0);
  const std::string token = nlohmann::json::parse(f.out)["token"];
  REQUIRE(RunCommand(absl::StrCat(f.owner, " enroll --owner acme --token ", token, " --ca-cert ", f.dir / "ca/ca.crt",
                                  " --ca-fingerprint ", f.fingerprint, " --coordinator ", f.coordinator->address(),
                                  " --identity ", f.dir / "acme"), &f.out) == 0);
  REQUIRE(f.Admin("expert register --owner acme --name x --domain code") == 0);
  const std::string remote = absl::StrCat(" --coordinator ", f.coordinator->address(), " --identity ", f.dir / "acme");
  const std::string owner = absl::StrCat("FLEXFED_CACHE_DIR=", f.dir / "cache", " ", f.owner);
  const std::string anchor = f.dir / "acme_anchor", data = f.dir / "acme.txt";
  std::string text;
  for (int i = 0; i < 400; ++i) text += absl::StrCat("def f", i, "(x):\n    return x * ", i * 7 % 101, "\n\n");
  REQUIRE(WriteFileAtomically(data, text).ok());

  const int64_t anchor_bytes = 2'969'830'000;
  CHECK(steps.Run("pull (anchor, 2.97 GB)", owner + " pull --to " + anchor + remote).max_rss_bytes < anchor_bytes / 4);
  steps.Run("router-init (1 document, 64 tokens)", owner + " router-init --anchor " + anchor + " --data " + data +
                                                       " --samples 1 --max-tokens 64 --out " + f.dir / "r.safetensors");
  steps.Run("train (2 steps of 64 tokens, fp32 master weights)",
            owner + " train --anchor " + anchor + " --router-init " + f.dir / "r.safetensors" + " --data " + data + " --run " +
                f.dir / "run" + " --steps 2 --seq-len 64 --batch-size 1 --warmup 1 --val-every 0 --plain");
  steps.Run("eval (2 sequences of 64 tokens)",
            owner + " eval " + f.dir / "run/model" + " --data " + data + " --seq-len 64 --max-sequences 2 --json");
  CHECK(steps.Run("export (module 1.61 GB)", owner + " export --run " + f.dir / "run" + " --anchor " + anchor + " --out " +
                                                 f.dir / "acme.module --owner acme --name x")
            .max_rss_bytes < anchor_bytes);
  CHECK(steps.Run("push (module 1.61 GB)", owner + " push " + f.dir / "acme.module --expert acme/x --anchor " + anchor + remote)
            .max_rss_bytes < anchor_bytes / 4);
  REQUIRE(f.Admin("expert enable acme/x") == 0);
  REQUIRE(f.Admin("release build --json") == 0);
  CHECK(steps.Run("release export (download + merge, 4.6 GB out)",
                  f.ctl + " release export rel-0001 " + f.dir / "rel --anchor " + f.dir / "anchor --coordinator " +
                      f.coordinator->address() + " --identity " + f.dir / "ca/admin")
            .max_rss_bytes < anchor_bytes / 2);
  steps.Run("flexfedctl logits on the release (2 texts)",
            f.ctl + " logits " + f.dir / "rel --text 'def f(x):' --text 'return x * 7' -o " + f.dir / "rel.logits.safetensors");
}

TEST_CASE("7B shape: a random anchor, its forward pass, an 8.7 GB module written, merged, pushed; the anchor pulled", "[real_size][slow]") {
  // Disk: the anchor (13.5 GB), the module (8.7), the merge (22.2, removed), the coordinator's copies
  // (22.2) and the pulled anchor (13.5): at most 58 GB at once.
  const std::string tokenizer_dir = (fs::path(BinaryFromEnv("FLEXFED_TOKENIZER_ORACLE_DIR")) / "dolma2").string();
  const std::string ctl = BinaryFromEnv("FLEXFED_CTL"), owner_bin = BinaryFromEnv("FLEXFED_OWNER");
  TempDir dir;
  const std::string anchor = dir / "anchor", cache = "FLEXFED_CACHE_DIR=" + dir / "cache ";
  Steps steps("7B shape (hidden 4096, 32 layers, FFN 11008, vocabulary 100352, bf16), CPU:");
  const testing::Measured made = steps.Run("random-checkpoint (13.5 GB, 2 GiB shards)",
                                           ctl + " random-checkpoint --size 7b --max-shard-mib 2048 --tokenizer " + tokenizer_dir +
                                               " --out " + anchor);
  CHECK(made.max_rss_bytes < (6ll << 30));
  REQUIRE(WriteFileAtomically(dir / "public.txt", "The public text of the anchor: a few words.").ok());
  steps.Run("router-init --public (1 document)", cache + owner_bin + " router-init --public --anchor " + anchor + " --data " +
                                                     dir / "public.txt --max-tokens 16 --out " + anchor + "/router_pub.safetensors");
  steps.Run("flexfedctl logits (4 tokens)", ctl + " logits " + anchor + " --ids 1,2,3,4 -o " + dir / "l.safetensors");

  // The module: the anchor's own FFN as the expert's (a trained 7B expert needs a GPU; issue #15),
  // written by the writer `flexfed-owner export` uses, tensor by tensor.
  const std::string module = dir / "acme.module";
  {
    Anchor a = ValueOrDie(LoadAnchor(anchor));
    ExpertTensors t;
    at::manual_seed(1);
    for (int64_t l = 0; l < a.model.config().num_hidden_layers; ++l) {
      t.ffn.push_back(a.model.layers()[l].experts[0]);
      t.router_rows.push_back(at::randn({a.model.config().hidden_size}));
      t.router_bias.push_back(at::tensor({-0.5f}));
    }
    testing::ResetPeakResident();
    const int64_t before = testing::ResidentBytes();
    const auto start = std::chrono::steady_clock::now();
    REQUIRE(WriteExpertModule(module, t, {a.id, ConfigHash(a.model.config()), "acme", "x", "code", 1000, "anchor"}).ok());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const int64_t growth = testing::PeakResidentBytes() - before;
    steps.Add("write the expert module (8.7 GB), peak growth", seconds, growth);
    CHECK(growth < (1ll << 30));
  }
  CHECK(fs::file_size(module) > 8'600'000'000ull);
  const testing::Measured merged =
      steps.Run("flexfedctl merge (22.2 GB out)", ctl + " merge " + module + " --anchor " + anchor + " --out " + dir / "merged");
  CHECK(merged.max_rss_bytes < (3ll << 30));
  const ModelConfig mc = ValueOrDie(ReadModelConfig(dir / "merged/config.json"));
  CHECK(mc.num_experts == 2);
  fs::remove_all(dir / "merged");

  // Through the coordinator: publish, push the module, pull the anchor.
  std::string out;
  REQUIRE(RunCommand(ctl + " ca init --dir " + dir / "ca", &out) == 0);
  const std::string fingerprint = out.substr(out.find("pin it): ") + 9, 64);
  CoordinatorProcess coordinator(dir / "ca", dir / "data", dir / "port");
  const std::string admin = " --coordinator " + coordinator.address() + " --identity " + dir / "ca/admin";
  steps.Run("anchor publish (13.5 GB)", ctl + " anchor publish " + anchor + admin);
  REQUIRE(RunCommand(ctl + " owner add acme --json" + admin, &out) == 0);
  const std::string token = nlohmann::json::parse(out)["token"];
  const std::string remote = " --coordinator " + coordinator.address() + " --identity " + dir / "acme";
  REQUIRE(RunCommand(owner_bin + " enroll --owner acme --token " + token + " --ca-cert " + dir / "ca/ca.crt" +
                         " --ca-fingerprint " + fingerprint + remote, &out) == 0);
  REQUIRE(RunCommand(ctl + " expert register --owner acme --name x --domain code" + admin, &out) == 0);
  const testing::Measured pushed =
      steps.Run("push (module 8.7 GB; the coordinator validates it)", owner_bin + " push " + module + " --expert acme/x --anchor " +
                                                                          anchor + remote);
  CHECK(pushed.max_rss_bytes < (1ll << 30));
  fs::remove(module);
  const testing::Measured pulled = steps.Run("pull (anchor 13.5 GB)", owner_bin + " pull --to " + dir / "pulled" + remote);
  CHECK(pulled.max_rss_bytes < (1ll << 30));
  CHECK(ValueOrDie(AnchorId(dir / "pulled")) == ValueOrDie(AnchorId(anchor)));
}

}  // namespace
}  // namespace flexfed
