// The model oracle's cases (tests/oracle/hf_model_cases.py): checkpoints that Hugging Face
// transformers built and saved, with what transformers computes on them.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/model/checkpoint.h"
#include "tests/test_util.h"

namespace flexfed::testing {

struct OracleCase {
  const char* name;
  double tolerance;  // relative error allowed against transformers
};

// F32: the same math in another order (HF's eager attention, its gather/scatter experts) stays
// within 1e-5 of transformers. BF16: transformers computes the router's logits and the expert mix in
// bf16 where FlexFed keeps the router in fp32 (docs/CHECKPOINTS.md), so values round differently.
inline constexpr OracleCase kOracleCases[] = {{"flex_olmo_f32", 1e-5},  {"flex_olmo_bias_f32", 1e-5},
                                              {"olmo2_f32", 1e-5},      {"flex_olmo_bf16", 3e-2},
                                              {"olmo2_bf16", 3e-2}};

// Where the oracle wrote its cases. ctest sets FLEXFED_ORACLE_DIR (and runs the oracle first);
// running the binary by hand needs it set to build/oracle.
inline std::string OracleDir() {
  const char* dir = std::getenv("FLEXFED_ORACLE_DIR");
  if (dir == nullptr) throw std::runtime_error("set FLEXFED_ORACLE_DIR to build/oracle (ctest does)");
  return dir;
}

inline std::string OracleCaseDir(const std::string& name) { return (std::filesystem::path(OracleDir()) / name).string(); }

// The case's expected.safetensors.
inline std::shared_ptr<const SafetensorsFile> OracleExpected(const std::string& name) {
  return ValueOrDie(SafetensorsFile::Open(OracleCaseDir(name) + "/expected.safetensors"));
}

}  // namespace flexfed::testing
