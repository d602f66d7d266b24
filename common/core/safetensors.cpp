// See docs/CHECKPOINTS.md, "Safetensors", for the format and each validation rule below.
#include "common/core/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

using nlohmann::json;

struct DtypeEntry {
  Dtype dtype;
  const char* name;
  uint64_t size;
};

constexpr DtypeEntry kDtypes[] = {
    {Dtype::kF64, "F64", 8}, {Dtype::kF32, "F32", 4}, {Dtype::kF16, "F16", 2},
    {Dtype::kBF16, "BF16", 2}, {Dtype::kI64, "I64", 8}, {Dtype::kI32, "I32", 4},
    {Dtype::kI16, "I16", 2}, {Dtype::kI8, "I8", 1}, {Dtype::kU8, "U8", 1},
    {Dtype::kBool, "BOOL", 1},
};

constexpr int kMaxJsonDepth = 4;  // {"t": {"shape": [..]}} is depth 3

absl::Status Invalid(const std::string& file, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(file, ": ", what, "; the file is not a valid safetensors file (re-export it)"));
}

absl::Status InvalidTensor(const std::string& file, const std::string& tensor, absl::string_view what) {
  return Invalid(file, absl::StrCat("tensor '", tensor, "': ", what));
}

// Reads a JSON unsigned integer that fits in `max`.
std::optional<uint64_t> AsUnsigned(const json& v, uint64_t max) {
  if (!v.is_number_unsigned()) return std::nullopt;
  uint64_t x = v.get<uint64_t>();
  if (x > max) return std::nullopt;
  return x;
}

absl::StatusOr<TensorInfo> ParseTensorEntry(const std::string& file, const std::string& name,
                                            const json& entry) {
  if (name.empty()) return Invalid(file, "a tensor has an empty name");
  if (!entry.is_object()) return InvalidTensor(file, name, "entry is not a JSON object");
  for (const auto& [key, _] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      return InvalidTensor(file, name, absl::StrCat("unexpected field '", key, "'"));
    }
  }
  TensorInfo info;
  info.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return InvalidTensor(file, name, "missing or non-string 'dtype'");
  }
  std::optional<Dtype> dtype = DtypeFromName(dtype_it->get_ref<const std::string&>());
  if (!dtype) {
    return InvalidTensor(file, name,
                         absl::StrCat("unknown dtype '", dtype_it->get_ref<const std::string&>(),
                                      "' (FlexFed reads F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)"));
  }
  info.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return InvalidTensor(file, name, "missing or non-array 'shape'");
  }
  for (const json& dim : *shape_it) {
    std::optional<uint64_t> d = AsUnsigned(dim, std::numeric_limits<int64_t>::max());
    if (!d) return InvalidTensor(file, name, "shape holds something other than a non-negative integer");
    info.shape.push_back(static_cast<int64_t>(*d));
  }

  auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
    return InvalidTensor(file, name, "'data_offsets' must be an array [begin, end]");
  }
  std::optional<uint64_t> begin = AsUnsigned((*offsets_it)[0], std::numeric_limits<uint64_t>::max());
  std::optional<uint64_t> end = AsUnsigned((*offsets_it)[1], std::numeric_limits<uint64_t>::max());
  if (!begin || !end) return InvalidTensor(file, name, "'data_offsets' are not non-negative integers");
  if (*end < *begin) return InvalidTensor(file, name, "'data_offsets' end is before begin");
  info.begin = *begin;
  info.end = *end;

  std::optional<uint64_t> bytes = TensorByteSize(info.shape, info.dtype);
  if (!bytes) {
    return InvalidTensor(file, name,
                         absl::StrCat("shape ", ShapeString(info.shape), " overflows a 64-bit byte count"));
  }
  if (*end - *begin != *bytes) {
    return InvalidTensor(file, name,
                         absl::StrCat("data_offsets [", *begin, ", ", *end, ") hold ", *end - *begin,
                                      " bytes but shape ", ShapeString(info.shape), " of ",
                                      DtypeName(info.dtype), " needs ", *bytes));
  }
  return info;
}

}  // namespace

const char* DtypeName(Dtype dtype) {
  for (const DtypeEntry& e : kDtypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

std::optional<Dtype> DtypeFromName(std::string_view name) {
  for (const DtypeEntry& e : kDtypes) {
    if (name == e.name) return e.dtype;
  }
  return std::nullopt;
}

uint64_t DtypeSize(Dtype dtype) {
  for (const DtypeEntry& e : kDtypes) {
    if (e.dtype == dtype) return e.size;
  }
  return 0;
}

std::optional<uint64_t> TensorByteSize(const std::vector<int64_t>& shape, Dtype dtype) {
  uint64_t n = DtypeSize(dtype);
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<SafetensorsLayout> ParseSafetensors(const std::string& file, const uint8_t* bytes,
                                                   uint64_t size) {
  if (size < 8) {
    return absl::OutOfRangeError(absl::StrCat(
        file, ": ", size, " bytes is too short for a safetensors file (the file is truncated)"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeaderBytes) {
    return Invalid(file, absl::StrCat("header length ", header_len, " exceeds the 100 MB limit"));
  }
  if (header_len > size - 8) {
    return absl::OutOfRangeError(absl::StrCat(file, ": header length ", header_len,
                                              " runs past the end of the file (", size,
                                              " bytes); the file is truncated"));
  }

  // Parse with a callback that tracks every object's keys: nlohmann keeps the last of duplicate
  // keys silently, and a duplicated tensor name must be an error.
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  bool too_deep = false;
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        if (depth > kMaxJsonDepth) too_deep = true;
        open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::array_start:
        if (depth > kMaxJsonDepth) too_deep = true;
        break;
      case json::parse_event_t::key:
        if (!open_objects.empty() && !open_objects.back().insert(parsed.get<std::string>()).second &&
            duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
        break;
      default:
        break;
    }
    return !too_deep;
  };
  const char* text = reinterpret_cast<const char*>(bytes + 8);
  json header = json::parse(text, text + header_len, callback, /*allow_exceptions=*/false);
  if (too_deep) return Invalid(file, "header JSON is nested too deeply");
  if (header.is_discarded()) return Invalid(file, "header is not valid JSON");
  if (!header.is_object()) return Invalid(file, "header is not a JSON object");
  if (!duplicate.empty()) return Invalid(file, absl::StrCat("duplicate name '", duplicate, "' in the header"));

  SafetensorsLayout layout;
  layout.data_offset = 8 + header_len;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return Invalid(file, "__metadata__ is not a JSON object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return Invalid(file, absl::StrCat("__metadata__ value for '", key, "' is not a string"));
        }
        layout.metadata.emplace(key, value.get<std::string>());
      }
      continue;
    }
    absl::StatusOr<TensorInfo> info = ParseTensorEntry(file, name, entry);
    if (!info.ok()) return info.status();
    layout.tensors.push_back(*std::move(info));
  }

  std::sort(layout.tensors.begin(), layout.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  const uint64_t data_size = size - layout.data_offset;
  uint64_t expected = 0;
  for (const TensorInfo& t : layout.tensors) {
    if (t.begin < expected) {
      return InvalidTensor(file, t.name, absl::StrCat("data_offsets [", t.begin, ", ", t.end,
                                                      ") overlap the previous tensor (ends at ", expected, ")"));
    }
    if (t.begin > expected) {
      return InvalidTensor(file, t.name, absl::StrCat("data starts at ", t.begin, " but the previous tensor ends at ",
                                                      expected, ": bytes in between belong to no tensor"));
    }
    if (t.end > data_size) {
      return absl::OutOfRangeError(absl::StrCat(file, ": tensor '", t.name, "': data ends at ", t.end,
                                                " but the data section holds ", data_size,
                                                " bytes; the file is truncated"));
    }
    expected = t.end;
  }
  if (expected != data_size) {
    return Invalid(file, absl::StrCat("the last ", data_size - expected,
                                      " bytes of the data section belong to no tensor"));
  }
  return layout;
}

absl::StatusOr<std::string> BuildSafetensorsHeader(std::vector<TensorInfo>& tensors,
                                                   const std::map<std::string, std::string>& metadata) {
  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    uint64_t sa = DtypeSize(a.dtype), sb = DtypeSize(b.dtype);
    if (sa != sb) return sa > sb;
    return a.name < b.name;
  });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string_view> names;
  for (TensorInfo& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat("invalid tensor name '", t.name, "'"));
    }
    if (!names.insert(t.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' is given twice"));
    }
    std::optional<uint64_t> bytes = TensorByteSize(t.shape, t.dtype);
    if (!bytes || __builtin_add_overflow(offset, *bytes, &t.end)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' is too large"));
    }
    t.begin = offset;
    offset = t.end;
    header[t.name] = {{"dtype", DtypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  // nlohmann's default object is a std::map, so keys come out sorted: deterministic.
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += text;
  return out;
}

}  // namespace flexfed
