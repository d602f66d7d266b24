// The safetensors file format: dtypes, strict header validation and deterministic headers.
// Spec and the exact validation rules: docs/CHECKPOINTS.md, "Safetensors".
//
// This file is torch-free on purpose: the fuzz target (tests/fuzz/) compiles it with clang and
// libFuzzer without LibTorch. Tensors as at::Tensor views live in common/model/checkpoint.h.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

enum class Dtype { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

// "F32", "BF16", ... as written in safetensors headers.
const char* DtypeName(Dtype dtype);
std::optional<Dtype> DtypeFromName(std::string_view name);
uint64_t DtypeSize(Dtype dtype);

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section, [begin, end)
  uint64_t end = 0;
};

struct SafetensorsLayout {
  std::vector<TensorInfo> tensors;  // in data order (ascending begin)
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // 8 + header length: where the data section starts in the file
};

inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Validates a whole safetensors file held in `bytes` (typically a read-only mapping) and returns
// its layout. Every rule of docs/CHECKPOINTS.md is checked; errors are kInvalidArgument (or
// kOutOfRange for truncation) and name `file_name` and, where there is one, the tensor.
absl::StatusOr<SafetensorsLayout> ParseSafetensors(const std::string& file_name,
                                                   const uint8_t* bytes, uint64_t size);

// Assigns data offsets to `tensors` (name, dtype, shape are inputs; begin/end are outputs) in the
// canonical order — dtype size descending, then name — so every tensor's data is aligned to its
// element size, and returns the file prefix: 8-byte little-endian length + JSON header padded
// with spaces to a multiple of 8. Byte-for-byte deterministic for the same inputs.
// Fails if names repeat or a size overflows.
absl::StatusOr<std::string> BuildSafetensorsHeader(
    std::vector<TensorInfo>& tensors, const std::map<std::string, std::string>& metadata);

// numel × element size, or nullopt on a negative dimension or uint64 overflow.
std::optional<uint64_t> TensorByteSize(const std::vector<int64_t>& shape, Dtype dtype);

std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace flexfed
