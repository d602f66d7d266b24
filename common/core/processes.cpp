#include "common/core/processes.h"

#include <arpa/inet.h>
#include <csignal>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"

namespace flexfed {
namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};

extern "C" void OnStopSignal(int sig) {
  g_signal.store(sig);
  g_stop.store(true);
}

// This process's own command line, as it was started.
std::vector<std::string> OwnArguments() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  std::string current;
  for (char c : all) {
    if (c == '\0') {
      args.push_back(current);
      current.clear();
    } else {
      current += c;
    }
  }
  return args;
}

int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

std::string Describe(int status) {
  if (WIFSIGNALED(status)) return absl::StrCat("was killed by signal ", WTERMSIG(status), " (", strsignal(WTERMSIG(status)), ")");
  return absl::StrCat("exited with code ", WEXITSTATUS(status));
}

}  // namespace

const std::atomic<bool>& InstallStopSignals() {
  std::signal(SIGINT, OnStopSignal);
  std::signal(SIGTERM, OnStopSignal);
  return g_stop;
}

int StopSignal() { return g_signal.load(); }

int RunWorkers(const WorkerLaunch& launch, std::string* failure) {
  const int world = launch.nnodes * launch.nproc_per_node;
  int port = launch.master_port;
  if (port == 0) {
    if (launch.nnodes > 1) {
      *failure = "--master-port is required with --nnodes > 1 (every machine must name the same one)";
      return 1;
    }
    port = FreeLoopbackPort();
    if (port == 0) {
      *failure = "could not find a free TCP port on 127.0.0.1 for the workers' rendezvous; give --master-port";
      return 1;
    }
  }
  const std::vector<std::string> args = OwnArguments();
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);

  InstallStopSignals();
  std::map<pid_t, int> ranks;  // running workers
  for (int i = 0; i < launch.nproc_per_node; ++i) {
    const int rank = launch.node_rank * launch.nproc_per_node + i;
    const pid_t pid = fork();
    if (pid < 0) {
      *failure = absl::StrCat("could not start worker ", rank, ": ", std::strerror(errno));
      for (const auto& [p, r] : ranks) kill(p, SIGKILL);
      return 1;
    }
    if (pid == 0) {
      setenv("RANK", std::to_string(rank).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(i).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(launch.nproc_per_node).c_str(), 1);
      setenv("MASTER_ADDR", launch.master_addr.c_str(), 1);
      setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      std::signal(SIGINT, SIG_DFL);
      std::signal(SIGTERM, SIG_DFL);
      execv("/proc/self/exe", argv.data());
      std::_Exit(127);
    }
    ranks[pid] = rank;
  }
  bool forwarded = false, failed = false;
  int stop_signal = 0;
  while (!ranks.empty()) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno != EINTR) break;
      if (g_stop.load() && !forwarded) {  // pass the stop on once; the workers checkpoint together
        forwarded = true;
        stop_signal = g_signal.load();
        for (const auto& [p, r] : ranks) kill(p, stop_signal);
      }
      continue;
    }
    auto it = ranks.find(pid);
    if (it == ranks.end()) continue;
    const int rank = it->second;
    ranks.erase(it);
    const bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    const bool stopped = forwarded && WIFEXITED(status) && WEXITSTATUS(status) == 128 + stop_signal;
    if (!clean && !stopped && !failed) {
      failed = true;
      *failure = absl::StrCat("rank ", rank, " ", Describe(status), "; the other ranks were stopped. The last complete "
                              "checkpoint is kept: continue with --resume (at any number of processes)");
      for (const auto& [p, r] : ranks) kill(p, SIGKILL);  // they would wait on it in a collective
    }
  }
  if (failed) return 1;
  return forwarded ? 128 + stop_signal : 0;
}

int64_t ProcessStatusBytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind(field + ":", 0) != 0) continue;
    const char* value = line.c_str() + field.size() + 1;
    char* end = nullptr;
    const long long kib = std::strtoll(value, &end, 10);
    return end == value ? -1 : static_cast<int64_t>(kib) * 1024;
  }
  return -1;
}

bool KeepFreedMemoryForReuse() {
#if defined(__GLIBC__)
  // mallopt(3): M_MMAP_MAX 0 serves no allocation by mmap; M_TRIM_THRESHOLD -1 disables trimming.
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, -1) == 1;
#else
  return false;
#endif
}

}  // namespace flexfed
