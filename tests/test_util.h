// Helpers shared by FlexFed's tests.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sys/wait.h>
#include <string>

#include "absl/status/statusor.h"
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

// The path of a binary that ctest passes in an environment variable.
inline std::string BinaryFromEnv(const char* variable) {
  const char* path = std::getenv(variable);
  if (path == nullptr) throw std::runtime_error(std::string("set ") + variable + " (ctest does)");
  return path;
}

// max |a - b| / max |b|, in fp64.
inline double RelativeError(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
  const double scale = b64.abs().max().item<double>();
  return (a64 - b64).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
}

template <typename T>
T ValueOrDie(absl::StatusOr<T> v) {
  if (!v.ok()) throw std::runtime_error(std::string(v.status().message()));
  return *std::move(v);
}

}  // namespace flexfed::testing
