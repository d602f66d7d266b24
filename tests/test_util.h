// Helpers shared by FlexFed's tests.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <malloc.h>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdexcept>
#include <string>

#include "absl/status/statusor.h"
#include "common/train/memory_plan.h"
#include "tests/temp_dir.h"

namespace flexfed::testing {

// Runs a shell command; returns its exit code and, via `output`, what it printed (stdout+stderr).
inline int RunCommand(const std::string& command, std::string* output = nullptr) {
  TempDir dir;
  const std::string out = dir / "out";
  const int status = std::system((command + " >" + out + " 2>&1").c_str());
  if (output) {
    std::ifstream in(out);
    output->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// A command run through the shell, with its exit code, wall time and peak resident memory (of the
// shell and what it ran, as wait4 reports it).
struct Measured {
  int status = -1;
  double seconds = 0;
  int64_t max_rss_bytes = 0;
};
inline Measured RunMeasured(const std::string& command, std::string* output = nullptr) {
  TempDir dir;
  const std::string out = dir / "out";
  const std::string full = command + " >" + out + " 2>&1";
  Measured m;
  const auto start = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", full.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  struct rusage usage {};
  if (pid > 0 && ::wait4(pid, &status, 0, &usage) == pid) {
    m.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    m.max_rss_bytes = static_cast<int64_t>(usage.ru_maxrss) * 1024;
  }
  m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (output) {
    std::ifstream in(out);
    output->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return m;
}

// A "Vm...:" field of /proc/self/status in bytes, or -1.
inline int64_t ProcStatusBytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field, 0) == 0) return std::stoll(line.substr(field.size())) * 1024;
  }
  return -1;
}
// This process's resident memory now (VmRSS), and its peak (VmHWM) since ResetPeakResident().
inline int64_t ResidentBytes() { return ProcStatusBytes("VmRSS:"); }
inline int64_t PeakResidentBytes() { return ProcStatusBytes("VmHWM:"); }
inline void ResetPeakResident() { std::ofstream("/proc/self/clear_refs") << "5"; }

// The path of a binary that ctest passes in an environment variable.
inline std::string BinaryFromEnv(const char* variable) {
  const char* path = std::getenv(variable);
  if (path == nullptr) throw std::runtime_error(std::string("set ") + variable + " (ctest does)");
  return path;
}

// The bytes of a memory plan's part `name`; throws (failing the test) when the plan has no such part.
inline int64_t PlanPartBytes(const MemoryPlan& plan, const std::string& name) {
  const MemoryPlanPart* part = plan.Find(name);
  if (part == nullptr) throw std::runtime_error("the memory plan has no part '" + name + "'");
  return part->bytes;
}

// Bytes glibc's allocator has handed out and not taken back (heap and mmapped chunks), as seen from
// the calling thread's arena: the memory tests run LibTorch on one thread.
inline int64_t HeapInUse() {
  const struct mallinfo2 m = mallinfo2();
  return static_cast<int64_t>(m.uordblks + m.hblkhd);
}

// Sets (or, with nullptr, removes) an environment variable for a scope; restores it after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value != nullptr) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      ::setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// max |a - b| / max |b|, in fp64.
inline double RelativeError(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
  const double scale = b64.abs().max().item<double>();
  return (a64 - b64).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
}

}  // namespace flexfed::testing
