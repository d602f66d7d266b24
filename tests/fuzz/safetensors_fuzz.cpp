// libFuzzer target for the safetensors header validator (common/core/safetensors.cpp). Built with clang
// (tests/fuzz/CMakeLists.txt) and run by ctest for a bounded number of inputs from the seed corpus.
// Besides crashes and sanitizer reports, it checks that every accepted file obeys the rules the
// rest of FlexFed relies on: tensors tile the data section exactly, in bounds, sizes consistent.
#include <cstdint>
#include <cstdlib>

#include "common/core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<flexfed::SafetensorsLayout> layout = flexfed::ParseSafetensors("fuzz", data, size);
  if (!layout.ok()) return 0;
  if (layout->data_offset < 8 || layout->data_offset > size) std::abort();
  uint64_t expected = 0;
  for (const flexfed::TensorInfo& t : layout->tensors) {
    if (t.begin != expected || t.end < t.begin) std::abort();
    std::optional<uint64_t> bytes = flexfed::TensorByteSize(t.shape, t.dtype);
    if (!bytes || *bytes != t.end - t.begin) std::abort();
    expected = t.end;
  }
  if (expected != size - layout->data_offset) std::abort();
  // What was accepted can be written back.
  std::vector<flexfed::TensorInfo> tensors = layout->tensors;
  if (!flexfed::BuildSafetensorsHeader(tensors, layout->metadata).ok()) std::abort();
  return 0;
}
