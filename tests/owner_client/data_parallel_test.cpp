// Data-parallel owner training (common/train/distributed.h) with real processes: flexfed-owner train
// --nproc-per-node 2 over Gloo — or two launchers with --nnodes 2, or workers started with torchrun's
// variables — gives the one-process run's losses and weights (the gradients summed during the
// backward or after it; DP-SGD too); a rank killed with SIGKILL stops the group, and the run resumes
// from its last checkpoint at 2 or at 1 process.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/core/file_util.h"
#include "common/core/processes.h"
#include "common/model/model.h"
#include "common/train/distributed.h"
#include "tests/test_util.h"
#include <nlohmann/json.hpp>

extern char** environ;

namespace flexfed {
namespace {

using testing::RelativeError;
using testing::RunCommand;
using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

std::string Owner() { return testing::BinaryFromEnv("FLEXFED_OWNER"); }

TEST_CASE("ZeRO-1 shards balance the optimizer state; each rank takes a contiguous share", "[data_parallel]") {
  const std::vector<int> owner = ShardOptimizerState({100, 10, 100, 50, 40, 10}, 2);
  // Largest first to the least loaded: 100→0, 100→1, 50→0, 40→1, 10→1, 10→0.
  CHECK(owner == std::vector<int>{0, 1, 1, 0, 1, 0});
  CHECK(ShardOptimizerState({5, 5, 5}, 1) == std::vector<int>{0, 0, 0});
  const std::vector<int64_t> step = {7, 3, 9, 1, 4};
  CHECK(ShareOfStep(step, 0, 2) == std::vector<int64_t>{7, 3, 9});
  CHECK(ShareOfStep(step, 1, 2) == std::vector<int64_t>{1, 4});
  CHECK(ShareOfStep(step, 3, 4) == std::vector<int64_t>{4});
  CHECK(ShareOfStep({1}, 1, 2).empty());
  CHECK(ShareOfStep(step, 0, 1) == step);
}

TEST_CASE("launcher settings in the environment are read and checked", "[data_parallel]") {
  unsetenv("RANK");
  CHECK_FALSE(ValueOrDie(DistributedSettings::FromEnvironment()).has_value());
  setenv("RANK", "1", 1);
  setenv("WORLD_SIZE", "2", 1);
  setenv("MASTER_PORT", "29400", 1);
  const DistributedSettings s = *ValueOrDie(DistributedSettings::FromEnvironment());
  CHECK(s.rank == 1);
  CHECK(s.world_size == 2);
  CHECK(s.master_port == 29400);
  setenv("RANK", "2", 1);
  CHECK_THAT(std::string(DistributedSettings::FromEnvironment().status().message()), Catch::Contains("not below WORLD_SIZE"));
  setenv("RANK", "x", 1);
  CHECK_THAT(std::string(DistributedSettings::FromEnvironment().status().message()), Catch::Contains("RANK=x"));
  for (const char* v : {"RANK", "WORLD_SIZE", "MASTER_PORT"}) unsetenv(v);
}

// A TCP port on loopback that no one listens on now.
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0);
  REQUIRE(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  close(fd);
  return ntohs(a.sin_port);
}

TEST_CASE("gradients are summed while the last backward runs, bucket by bucket in order", "[data_parallel]") {
  DistributedSettings one;
  one.master_port = FreePort();
  one.timeout_seconds = 60;
  const std::unique_ptr<DataParallelGroup> group = ValueOrDie(DataParallelGroup::Join(one, false));
  at::manual_seed(15);
  // Reverse order: d opens a bucket of small tensors and c joins it (one flattened buffer), b (8 MB)
  // has its own, and a (0.4 MB) opens the next — small, but the bucket before holds a large tensor alone.
  at::Tensor a = at::randn({100, 1000}).requires_grad_(true), b = at::randn({2000, 1000}).requires_grad_(true),
             c = at::randn({10}).requires_grad_(true), d = at::randn({3, 7}).requires_grad_(true);
  OverlappedGradientSum sum(*group, {a, b, c, d});
  CHECK(sum.buckets() == 3);
  auto backward = [&](bool with_c) {
    at::Tensor loss = (a * 2).sum() + b.pow(2).sum() + (d * 3).sum();
    if (with_c) loss = loss + c.sum();
    loss.backward();
  };
  // Two micro-batches: the first's gradients stay as they are; the second's start their buckets as
  // they arrive, all three before the backward returns.
  backward(true);
  CHECK(sum.started() == 0);
  sum.Arm();
  backward(true);
  CHECK(sum.started() == 3);
  sum.Finish();
  CHECK(sum.started() == 0);
  CHECK(at::equal(a.grad(), at::full_like(a, 4.0)));
  CHECK(at::allclose(b.grad(), 4 * b.detach(), 1e-6, 0));
  CHECK(at::equal(c.grad(), at::full_like(c, 2.0)));
  CHECK(at::equal(d.grad(), at::full_like(d, 6.0)));  // from its own place in the flattened buffer
  // A step whose backward misses c: c's bucket — the first — waits for Finish, and so do the buckets
  // after it (every rank starts them in the same order); c is left without a gradient, as no rank has one.
  for (at::Tensor* t : {&a, &b, &c, &d}) t->mutable_grad() = at::Tensor();
  sum.Arm();
  backward(false);
  CHECK(sum.started() == 0);
  sum.Finish();
  CHECK_FALSE(c.grad().defined());
  CHECK(at::equal(d.grad(), at::full_like(d, 3.0)));  // its bucket's other member summed all the same
  CHECK(at::equal(a.grad(), at::full_like(a, 2.0)));
  // A gradient that changes after its bucket started is an error, not a wrong sum.
  for (at::Tensor* t : {&a, &b, &c, &d}) t->mutable_grad() = at::Tensor();
  sum.Arm();
  backward(true);
  CHECK_THROWS_WITH(backward(true), Catch::Contains("changed after its all-reduce started"));
  sum.Finish();
}

// Minor page faults of this process so far.
long MinorFaults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// Whether writing a freed 256 MiB block, allocated again, faults pages in (at least 100 faults:
// 65536 with 4 KiB pages, 128 with transparent huge pages), in a child process (the policy is
// process-wide): 1 yes, 0 no, -1 if the child failed.
int FaultsOnReuse(bool keep_freed_memory) {
  const pid_t child = fork();
  if (child == 0) {
    if (keep_freed_memory && !KeepFreedMemoryForReuse()) _exit(2);
    const size_t bytes = size_t{256} << 20;
    // The compiler must not drop the blocks: their addresses escape to an empty asm statement.
    char* first = static_cast<char*>(std::malloc(bytes));
    std::memset(first, 1, bytes);
    asm volatile("" : : "r"(first) : "memory");
    std::free(first);
    const long before = MinorFaults();
    char* again = static_cast<char*>(std::malloc(bytes));
    std::memset(again, 2, bytes);
    asm volatile("" : : "r"(again) : "memory");
    const long faults = MinorFaults() - before;
    std::free(again);
    _exit(faults >= 100 ? 1 : 0);
  }
  int status = 0;
  if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) > 1) return -1;
  return WEXITSTATUS(status);
}

TEST_CASE("CPU training keeps freed memory for reuse: no page faults for a step's second allocation", "[data_parallel]") {
  // glibc's default: the 256 MiB block goes back to the system and comes back as fresh pages.
  CHECK(FaultsOnReuse(false) == 1);
  CHECK(FaultsOnReuse(true) == 0);
}

// Field `name` of every logged step's entry in a run's metrics.jsonl (null where an entry lacks it).
std::vector<nlohmann::json> StepField(const fs::path& run, const std::string& name) {
  std::vector<nlohmann::json> out;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("loss")) out.push_back(j.value(name, nlohmann::json()));
  }
  return out;
}

// The losses logged at every step of a run.
std::vector<double> Losses(const fs::path& run) {
  std::vector<double> out;
  for (const nlohmann::json& loss : StepField(run, "loss")) out.push_back(loss.get<double>());
  return out;
}

// The routing logged at every step: per layer, the share of tokens whose first choice is each expert.
std::vector<nlohmann::json> Routing(const fs::path& run) { return StepField(run, "routing"); }

// The largest relative difference between two trained models' tensors.
double WeightDifference(const fs::path& a, const fs::path& b) {
  const FlexOlmoModel x = ValueOrDie(FlexOlmoModel::Load(a)), y = ValueOrDie(FlexOlmoModel::Load(b));
  const std::vector<NamedTensor> xs = x.NamedParameters(), ys = y.NamedParameters();
  REQUIRE(xs.size() == ys.size());
  double worst = 0;
  for (size_t i = 0; i < xs.size(); ++i) worst = std::max(worst, RelativeError(xs[i].tensor, ys[i].tensor));
  return worst;
}

// Starts a command (no shell) with its output in `log`; returns its pid.
pid_t Spawn(const std::vector<std::string>& args, const std::string& log, const std::string& cache) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<std::string> env_strings = {"FLEXFED_CACHE_DIR=" + cache};
  for (char** e = environ; *e != nullptr; ++e) env_strings.push_back(*e);
  std::vector<char*> env;
  for (std::string& e : env_strings) env.push_back(e.data());
  env.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = 0;
  REQUIRE(posix_spawn(&pid, args[0].c_str(), &actions, nullptr, argv.data(), env.data()) == 0);
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

// The worker of `launcher` whose RANK is `rank`.
pid_t Worker(pid_t launcher, int rank) {
  for (int attempt = 0; attempt < 2000; ++attempt) {
    std::ifstream children(absl::StrCat("/proc/", launcher, "/task/", launcher, "/children"));
    std::string text((std::istreambuf_iterator<char>(children)), std::istreambuf_iterator<char>());
    for (absl::string_view p : absl::StrSplit(text, ' ', absl::SkipWhitespace())) {
      std::ifstream environ_file(absl::StrCat("/proc/", p, "/environ"));
      std::string env((std::istreambuf_iterator<char>(environ_file)), std::istreambuf_iterator<char>());
      const std::string nul(1, '\0'), entry = absl::StrCat("RANK=", rank, nul);
      if (env.find(nul + entry) != std::string::npos || env.rfind(entry, 0) == 0) {
        return std::stoi(std::string(p));
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  FAIL("no worker with RANK=" << rank);
  return -1;
}

TEST_CASE("two Gloo processes train as one; a killed rank's run resumes at two or one process", "[data_parallel]") {
  TempDir dir;
  fs::create_directories(dir / "mine");
  for (int d = 0; d < 24; ++d) {
    std::string text;
    for (int i = 0; i < 30; ++i) text += absl::StrCat("record ", (d * 31 + i * 7) % 101, " of the ledger, total ", d * i, "\n");
    REQUIRE(WriteFileAtomically(absl::StrCat(dir / "mine", "/", d, ".txt"), text).ok());
  }
  const std::string cache = dir / "cache";
  const std::string o = absl::StrCat("FLEXFED_CACHE_DIR=", cache, " ", Owner());
  std::string out;
  REQUIRE(RunCommand(o + " train --pretrain test --data " + dir / "mine" + " --run " + dir / "anchor_run" +
                         " --steps 10 --seq-len 64 --batch-size 4 --val-every 0 --threads 1 --plain", &out) == 0);
  fs::copy(dir / "anchor_run/model", dir / "anchor");
  REQUIRE(RunCommand(o + " router-init --anchor " + dir / "anchor" + " --data " + dir / "mine" + " --public --out " +
                         dir / "anchor/router_pub.safetensors", &out) == 0);
  REQUIRE(RunCommand(o + " router-init --anchor " + dir / "anchor" + " --data " + dir / "mine" + " --out " + dir / "r.safetensors", &out) == 0);
  auto train = [&](const std::string& run, int steps, const std::string& extra) {
    return absl::StrCat(o, " train --anchor ", dir / "anchor", " --router-init ", dir / "r.safetensors",
                        " --data ", dir / "mine", " --run ", dir / run, " --steps ", steps,
                        " --seq-len 64 --batch-size 4 --grad-accum 2 --lr 3e-3 --warmup 2 --val-every 0 --log-every 1",
                        " --threads 1 --plain ", extra);
  };

  // The same global batch (2 × 4 sequences a step) on one process and split over two.
  REQUIRE(RunCommand(train("one", 12, ""), &out) == 0);
  REQUIRE(RunCommand(train("two", 12, "--nproc-per-node 2"), &out) == 0);
  CHECK_THAT(out, Catch::Contains("data-parallel: 2 processes"));
  const std::vector<double> one = Losses(dir / "one"), two = Losses(dir / "two");
  REQUIRE(one.size() == 12);
  REQUIRE(two.size() == 12);
  for (size_t i = 0; i < one.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(std::abs(two[i] - one[i]) <= 1e-6 * std::abs(one[i]));
  }
  CHECK(WeightDifference(dir / "two/model", dir / "one/model") <= 1e-6);
  // Each step of the two-process run says how long it spent exchanging gradients, totals and
  // weights: a part of the step (its tokens/s gives the step's time); the one-process run says nothing.
  const std::vector<nlohmann::json> communication = StepField(dir / "two", "communication_s"),
                                    tokens_per_s = StepField(dir / "two", "tokens_per_s");
  for (size_t i = 0; i < communication.size(); ++i) {
    INFO("step " << i + 1);
    REQUIRE(communication[i].is_number());
    CHECK(communication[i].get<double>() > 0);
    CHECK(communication[i].get<double>() < 8 * 64 / tokens_per_s[i].get<double>());  // 8 sequences of 64 tokens
  }
  for (const nlohmann::json& c : StepField(dir / "one", "communication_s")) CHECK(c.is_null());
  CHECK_THAT(out, Catch::Contains("| comm "));
  // The gradients summed after the backward instead of during it (as DP-SGD does): the same run.
  REQUIRE(RunCommand("FLEXFED_GRADIENT_OVERLAP=off " + train("two_after", 12, "--nproc-per-node 2"), &out) == 0);
  const std::vector<double> after = Losses(dir / "two_after");
  REQUIRE(after.size() == 12);
  for (size_t i = 0; i < after.size(); ++i) CHECK(std::abs(after[i] - one[i]) <= 1e-6 * std::abs(one[i]));
  CHECK(WeightDifference(dir / "two_after/model", dir / "one/model") <= 1e-6);
  // DP-SGD over two processes: the same Poisson batches, clipping and noise as one process.
  const std::string dp = "--dp-max-grad-norm 1 --dp-noise-multiplier 0.5";
  REQUIRE(RunCommand(train("one_dp", 4, dp), &out) == 0);
  REQUIRE(RunCommand(train("two_dp", 4, "--nproc-per-node 2 " + dp), &out) == 0);
  const std::vector<double> one_dp = Losses(dir / "one_dp"), two_dp = Losses(dir / "two_dp");
  REQUIRE(one_dp.size() == 4);
  REQUIRE(two_dp.size() == 4);
  for (size_t i = 0; i < one_dp.size(); ++i) CHECK(std::abs(two_dp[i] - one_dp[i]) <= 1e-6 * std::abs(one_dp[i]));
  CHECK(WeightDifference(dir / "two_dp/model", dir / "one_dp/model") <= 1e-6);

  // Across machines, here two on loopback, each with its own run folder: `--nnodes 2 --node-rank K
  // --master-addr --master-port` on each, and workers started by another launcher with torchrun's
  // variables. Both give the one-process run; only rank 0 writes a model.
  for (const bool own_launcher : {false, true}) {
    INFO((own_launcher ? "workers started with RANK, WORLD_SIZE, …" : "--nnodes 2"));
    const int port = FreePort();
    const std::string name = own_launcher ? "env" : "nodes";
    auto node = [&](int k) {
      const std::string run = absl::StrCat(name, k);
      if (own_launcher) {
        return absl::StrCat("RANK=", k, " WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=", port,
                            " ", train(run, 12, ""));
      }
      return train(run, 12, absl::StrCat("--nnodes 2 --node-rank ", k, " --master-addr 127.0.0.1 --master-port ", port));
    };
    const std::string log1 = dir / (name + "1.log");
    REQUIRE(RunCommand("(" + node(1) + " >" + log1 + " 2>&1) & second=$!; " + node(0) + "; first=$?; wait $second; second=$?; " +
                           "[ $first -eq 0 ] && [ $second -eq 0 ]", &out) == 0);
    const std::vector<double> spread = Losses(dir / (name + "0"));
    REQUIRE(spread.size() == 12);
    for (size_t i = 0; i < spread.size(); ++i) CHECK(std::abs(spread[i] - one[i]) <= 1e-6 * std::abs(one[i]));
    CHECK(WeightDifference(dir / (name + "0/model"), dir / "one/model") <= 1e-6);
    CHECK_FALSE(fs::exists(dir / (name + "1/model")));
  }
  // The routing counts (kept on the device, summed over the ranks at each log) give the same shares.
  const std::vector<nlohmann::json> routing_one = Routing(dir / "one"), routing_two = Routing(dir / "two");
  REQUIRE(routing_one.size() == 12);
  REQUIRE(routing_two.size() == 12);
  for (size_t i = 0; i < routing_one.size(); ++i) {
    INFO("step " << i + 1);
    REQUIRE(routing_one[i].size() == 2);  // the test preset's layers
    for (size_t l = 0; l < 2; ++l) {
      const double a = routing_one[i][l][0].get<double>(), b = routing_one[i][l][1].get<double>();
      CHECK(a + b == Approx(1.0));
      // 512 tokens a step: a token or two may flip where the two runs' logits differ in the last bits.
      CHECK(routing_two[i][l][0].get<double>() == Approx(a).margin(2.0 / 512));
      CHECK(routing_two[i][l][1].get<double>() == Approx(b).margin(2.0 / 512));
    }
  }
  // The checkpoint is the one-process format: both runs' optimizer files hold the same tensors.
  const std::string latest = ValueOrDie(ReadFile(dir / "two/checkpoints/latest"));
  CHECK(fs::file_size(fs::path(dir / "two/checkpoints") / latest / "optimizer.safetensors") ==
        fs::file_size(fs::path(dir / "one/checkpoints") / latest / "optimizer.safetensors"));

  // The 7B recipe's settings (bf16 moments, checkpointed layers) split over two processes: the same
  // run, its bf16 moments gathered into the one-process checkpoint.
  const std::string compact = "--optimizer-moments bf16 --activation-checkpointing --checkpoint-every 3";
  REQUIRE(RunCommand(train("one_compact", 6, compact), &out) == 0);
  REQUIRE(RunCommand(train("two_compact", 6, "--nproc-per-node 2 " + compact), &out) == 0);
  CHECK_THAT(out, Catch::Contains("bf16 AdamW moments, activation checkpointing"));
  const std::vector<double> one_c = Losses(dir / "one_compact"), two_c = Losses(dir / "two_compact");
  REQUIRE(one_c.size() == 6);
  REQUIRE(two_c.size() == 6);
  for (size_t i = 0; i < one_c.size(); ++i) CHECK(std::abs(two_c[i] - one_c[i]) <= 1e-6 * std::abs(one_c[i]));
  CHECK(WeightDifference(dir / "two_compact/model", dir / "one_compact/model") <= 1e-6);
  const std::string step6 = ValueOrDie(ReadFile(dir / "two_compact/checkpoints/latest"));
  CHECK(fs::file_size(fs::path(dir / "two_compact/checkpoints") / step6 / "optimizer.safetensors") ==
        fs::file_size(fs::path(dir / "one_compact/checkpoints") / step6 / "optimizer.safetensors"));
  CHECK(fs::file_size(fs::path(dir / "two_compact/checkpoints") / step6 / "optimizer.safetensors") <
        fs::file_size(fs::path(dir / "one/checkpoints") / latest / "optimizer.safetensors") * 6 / 10);  // bf16: half

  // Rank 1 killed with SIGKILL once a checkpoint exists: the launcher stops rank 0 and fails.
  const int steps = 300;
  REQUIRE(RunCommand(train("whole", steps, "--nproc-per-node 2 --checkpoint-every 4"), &out) == 0);
  // The same command without the shell: its words after the environment assignment.
  const std::vector<std::string> words =
      absl::StrSplit(train("killed", steps, "--nproc-per-node 2 --checkpoint-every 4"), ' ', absl::SkipEmpty());
  const std::vector<std::string> args(words.begin() + 1, words.end());
  const pid_t launcher = Spawn(args, dir / "killed.log", cache);
  const pid_t rank1 = Worker(launcher, 1);
  for (int i = 0; i < 6000 && !fs::exists(dir / "killed/checkpoints/latest"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  REQUIRE(kill(rank1, SIGKILL) == 0);
  int status = 0;
  REQUIRE(waitpid(launcher, &status, 0) == launcher);
  const std::string log = ValueOrDie(ReadFile(dir / "killed.log"));
  INFO(log);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 1);  // killed before the end
  CHECK_THAT(log, Catch::Contains("rank 1 was killed by signal 9"));
  CHECK_THAT(log, Catch::Contains("--resume"));
  CHECK_FALSE(fs::exists(dir / "killed/model"));
  fs::copy(dir / "killed", dir / "killed_again", fs::copy_options::recursive);

  // Resumed at two processes: the uninterrupted run's weights.
  REQUIRE(RunCommand(o + " train --run " + dir / "killed" + " --resume --nproc-per-node 2 --threads 1 --plain", &out) == 0);
  CHECK_THAT(out, Catch::Contains("resuming at step"));
  CHECK(WeightDifference(dir / "killed/model", dir / "whole/model") <= 1e-6);
  CHECK(Losses(dir / "killed").size() == static_cast<size_t>(steps));
  // Resumed at one process from the same checkpoint: the same run, to rounding.
  REQUIRE(RunCommand(o + " train --run " + dir / "killed_again" + " --resume --threads 1 --plain", &out) == 0);
  CHECK(WeightDifference(dir / "killed_again/model", dir / "whole/model") <= 1e-5);
}

}  // namespace
}  // namespace flexfed
