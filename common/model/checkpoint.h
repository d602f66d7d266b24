// Safetensors files and checkpoint directories as LibTorch tensors.
// Format rules: docs/CHECKPOINTS.md. The byte-level format lives in common/core/safetensors.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/core/file_util.h"
#include "common/core/safetensors.h"

namespace flexfed {

absl::StatusOr<at::ScalarType> ToScalarType(Dtype dtype);
absl::StatusOr<Dtype> FromScalarType(at::ScalarType type);

// One validated, memory-mapped safetensors file. Tensors returned by Get() are zero-copy views of
// the mapping (copied only when the data is not aligned to its element size); each view keeps the
// mapping alive, so they may outlive this object. Writes to a view stay private to the process.
// Thread-safe after Open().
class SafetensorsFile {
 public:
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  const SafetensorsLayout& layout() const { return layout_; }
  const std::map<std::string, std::string>& metadata() const { return layout_.metadata; }
  std::vector<std::string> Names() const;  // sorted
  bool Contains(const std::string& name) const { return index_.count(name) > 0; }
  const TensorInfo* Find(const std::string& name) const;
  absl::StatusOr<at::Tensor> Get(const std::string& name) const;
  // The raw bytes of a tensor (for hashing without building a tensor).
  std::string_view Bytes(const TensorInfo& info) const;

 private:
  SafetensorsFile(std::shared_ptr<MappedFile> file, SafetensorsLayout layout);
  std::shared_ptr<MappedFile> file_;
  SafetensorsLayout layout_;
  std::map<std::string, size_t> index_;  // name -> position in layout_.tensors
};

struct NamedTensor {
  std::string name;
  at::Tensor tensor;                       // any device; row-major
  std::optional<at::ScalarType> write_as;  // written as this dtype (converted then), else as its own
};

// Writes `tensors` to `path` atomically (temp → fsync → rename), streaming one tensor at a time.
// The bytes depend only on the set of (name, dtype, shape, values) and the metadata, never on the
// order of `tensors`: the file is byte-for-byte reproducible.
absl::Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// A checkpoint directory: `model.safetensors`, or shards listed by `model.safetensors.index.json`.
// Every shard is validated; every tensor must be listed exactly once and live where the index says.
class Checkpoint {
 public:
  static absl::StatusOr<Checkpoint> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::vector<std::string> Names() const;  // sorted
  bool Contains(const std::string& name) const { return where_.count(name) > 0; }
  const TensorInfo* Find(const std::string& name) const;
  absl::StatusOr<at::Tensor> Get(const std::string& name) const;  // zero copy, see SafetensorsFile
  // Metadata of the (first) shard: safetensors keeps metadata per file.
  const std::map<std::string, std::string>& metadata() const { return shards_.front()->metadata(); }
  const std::vector<std::shared_ptr<const SafetensorsFile>>& shards() const { return shards_; }

 private:
  std::string dir_;
  std::vector<std::shared_ptr<const SafetensorsFile>> shards_;
  std::map<std::string, size_t> where_;  // tensor name -> shard
};

inline constexpr char kSingleFileName[] = "model.safetensors";
inline constexpr char kIndexFileName[] = "model.safetensors.index.json";
inline constexpr uint64_t kDefaultMaxShardBytes = 5ull << 30;

// Writes `tensors` into `dir` (created if missing) as one `model.safetensors` when the total fits
// `max_shard_bytes`, else as `model-0000i-of-0000n.safetensors` shards (filled in name order) plus
// the index. Each file is written atomically and the index last, so a reader never sees an index
// pointing to missing shards. Existing checkpoint files in `dir` are replaced.
absl::Status WriteCheckpoint(const std::string& dir, const std::vector<NamedTensor>& tensors,
                             const std::map<std::string, std::string>& metadata = {},
                             uint64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace flexfed
