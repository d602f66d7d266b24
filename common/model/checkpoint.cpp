// See docs/CHECKPOINTS.md for the file and directory formats.
#include "common/model/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace fs = std::filesystem;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

absl::StatusOr<at::ScalarType> ToScalarType(Dtype dtype) {
  switch (dtype) {
    case Dtype::kF64: return at::kDouble;
    case Dtype::kF32: return at::kFloat;
    case Dtype::kF16: return at::kHalf;
    case Dtype::kBF16: return at::kBFloat16;
    case Dtype::kI64: return at::kLong;
    case Dtype::kI32: return at::kInt;
    case Dtype::kI16: return at::kShort;
    case Dtype::kI8: return at::kChar;
    case Dtype::kU8: return at::kByte;
    case Dtype::kBool: return at::kBool;
  }
  return absl::InvalidArgumentError("unknown dtype");
}

absl::StatusOr<Dtype> FromScalarType(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return Dtype::kF64;
    case at::kFloat: return Dtype::kF32;
    case at::kHalf: return Dtype::kF16;
    case at::kBFloat16: return Dtype::kBF16;
    case at::kLong: return Dtype::kI64;
    case at::kInt: return Dtype::kI32;
    case at::kShort: return Dtype::kI16;
    case at::kChar: return Dtype::kI8;
    case at::kByte: return Dtype::kU8;
    case at::kBool: return Dtype::kBool;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("dtype ", c10::toString(type), " cannot be stored in safetensors by FlexFed"));
  }
}

SafetensorsFile::SafetensorsFile(std::shared_ptr<MappedFile> file, SafetensorsLayout layout)
    : file_(std::move(file)), layout_(std::move(layout)) {
  for (size_t i = 0; i < layout_.tensors.size(); ++i) index_.emplace(layout_.tensors[i].name, i);
}

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  absl::StatusOr<std::shared_ptr<MappedFile>> file = MappedFile::Open(path);
  if (!file.ok()) return file.status();
  absl::StatusOr<SafetensorsLayout> layout = ParseSafetensors(path, (*file)->data(), (*file)->size());
  if (!layout.ok()) return layout.status();
  return std::shared_ptr<const SafetensorsFile>(new SafetensorsFile(*std::move(file), *std::move(layout)));
}

std::vector<std::string> SafetensorsFile::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, _] : index_) names.push_back(name);
  return names;
}

const TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &layout_.tensors[it->second];
}

std::string_view SafetensorsFile::Bytes(const TensorInfo& info) const {
  return std::string_view(reinterpret_cast<const char*>(file_->data() + layout_.data_offset + info.begin),
                          info.end - info.begin);
}

absl::StatusOr<at::Tensor> SafetensorsFile::Get(const std::string& name) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(path(), ": no tensor named '", name, "'"));
  }
  absl::StatusOr<at::ScalarType> type = ToScalarType(info->dtype);
  if (!type.ok()) return type.status();
  auto options = at::TensorOptions().dtype(*type);
  if (info->end == info->begin) return at::empty(info->shape, options);
  uint8_t* ptr = file_->data() + layout_.data_offset + info->begin;
  if (reinterpret_cast<uintptr_t>(ptr) % DtypeSize(info->dtype) != 0) {
    // Unaligned data (a writer that does not sort by alignment): copy into an aligned tensor.
    at::Tensor t = at::empty(info->shape, options);
    std::memcpy(t.data_ptr(), ptr, info->end - info->begin);
    return t;
  }
  std::shared_ptr<MappedFile> keep_alive = file_;
  return at::from_blob(ptr, info->shape, [keep_alive](void*) {}, options);
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<TensorInfo> infos;
  std::map<std::string, const NamedTensor*> by_name;
  for (const NamedTensor& nt : tensors) {
    absl::StatusOr<Dtype> dtype = FromScalarType(nt.write_as.value_or(nt.tensor.scalar_type()));
    if (!dtype.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", nt.name, "': ", dtype.status().message()));
    infos.push_back(TensorInfo{nt.name, *dtype, nt.tensor.sizes().vec(), 0, 0});
    by_name.emplace(nt.name, &nt);
  }
  absl::StatusOr<std::string> header = BuildSafetensorsHeader(infos, metadata);
  if (!header.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", header.status().message()));

  absl::StatusOr<std::unique_ptr<AtomicFile>> out = AtomicFile::Create(path);
  if (!out.ok()) return out.status();
  if (absl::Status s = (*out)->Write(*header); !s.ok()) return s;
  // One tensor at a time; a tensor read from a mapped file gives its pages back once written, so
  // writing a model made of mapped tensors (a merge, an export) does not accumulate them.
  for (const TensorInfo& info : infos) {
    const NamedTensor& nt = *by_name.at(info.name);
    at::Tensor t = nt.tensor.detach().to(at::kCPU, nt.write_as.value_or(nt.tensor.scalar_type())).contiguous();
    if (absl::Status s = (*out)->Write(t.data_ptr(), t.nbytes()); !s.ok()) return s;
    if (nt.tensor.device().is_cpu() && nt.tensor.is_contiguous()) ReleaseMappedPages(nt.tensor.data_ptr(), nt.tensor.nbytes());
  }
  return (*out)->Commit();
}

absl::StatusOr<Checkpoint> Checkpoint::Open(const std::string& dir) {
  Checkpoint ckpt;
  ckpt.dir_ = dir;
  const fs::path index_path = fs::path(dir) / kIndexFileName;
  const fs::path single_path = fs::path(dir) / kSingleFileName;
  std::error_code ec;
  if (fs::exists(index_path, ec)) {
    absl::StatusOr<std::string> text = ReadFile(index_path.string());
    if (!text.ok()) return text.status();
    nlohmann::json index = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path.string(), ": not a valid index (needs a JSON object with a \"weight_map\" object)"));
    }
    std::map<std::string, size_t> shard_of_file;
    std::map<std::string, std::string> listed;  // tensor -> file
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map entry for '", name, "' is not a file name"));
      }
      const std::string& f = file.get_ref<const std::string&>();
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..") {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map entry for '", name,
                                                       "' names '", f, "', which is not a file in this directory"));
      }
      listed.emplace(name, f);
      if (shard_of_file.count(f) == 0) {
        absl::StatusOr<std::shared_ptr<const SafetensorsFile>> shard =
            SafetensorsFile::Open((fs::path(dir) / f).string());
        if (!shard.ok()) return shard.status();
        shard_of_file.emplace(f, ckpt.shards_.size());
        ckpt.shards_.push_back(*std::move(shard));
      }
    }
    for (const auto& [name, f] : listed) {
      size_t shard = shard_of_file.at(f);
      if (!ckpt.shards_[shard]->Contains(name)) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": tensor '", name, "' is listed in ", f,
                                                       " but that file does not hold it"));
      }
      ckpt.where_.emplace(name, shard);
    }
    for (const auto& [f, shard] : shard_of_file) {
      for (const std::string& name : ckpt.shards_[shard]->Names()) {
        auto it = listed.find(name);
        if (it == listed.end() || it->second != f) {
          return absl::InvalidArgumentError(absl::StrCat((fs::path(dir) / f).string(), ": tensor '", name,
                                                         "' is not listed for this file in ", kIndexFileName));
        }
      }
    }
    if (ckpt.shards_.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map is empty"));
    }
    return ckpt;
  }
  if (!fs::exists(single_path, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no ", kSingleFileName, " or ", kIndexFileName,
                                            " here; point to a checkpoint directory"));
  }
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(single_path.string());
  if (!file.ok()) return file.status();
  ckpt.shards_.push_back(*std::move(file));
  for (const std::string& name : ckpt.shards_[0]->Names()) ckpt.where_.emplace(name, 0);
  return ckpt;
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, _] : where_) names.push_back(name);
  return names;
}

const TensorInfo* Checkpoint::Find(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? nullptr : shards_[it->second]->Find(name);
}

absl::StatusOr<at::Tensor> Checkpoint::Get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": the checkpoint has no tensor named '", name, "'"));
  }
  return shards_[it->second]->Get(name);
}

absl::Status WriteCheckpoint(const std::string& dir, const std::vector<NamedTensor>& tensors,
                             const std::map<std::string, std::string>& metadata, uint64_t max_shard_bytes) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create directory: ", ec.message()));

  std::vector<const NamedTensor*> sorted;
  uint64_t total = 0;
  for (const NamedTensor& nt : tensors) {
    sorted.push_back(&nt);
    total += nt.tensor.nbytes();
  }
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name < b->name; });

  // Files of an earlier checkpoint in `dir` that the new one does not overwrite are removed last.
  std::set<std::string> stale;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::string f = entry.path().filename().string();
    if (f == kSingleFileName || f == kIndexFileName ||
        (f.rfind("model-", 0) == 0 && f.size() > 12 && f.substr(f.size() - 12) == ".safetensors")) {
      stale.insert(f);
    }
  }

  if (total <= max_shard_bytes) {
    if (absl::Status s = WriteSafetensors((fs::path(dir) / kSingleFileName).string(), tensors, metadata); !s.ok()) return s;
    stale.erase(kSingleFileName);
  } else {
    std::vector<std::vector<NamedTensor>> shards(1);
    uint64_t in_shard = 0;
    for (const NamedTensor* nt : sorted) {
      uint64_t bytes = nt->tensor.nbytes();
      if (in_shard > 0 && in_shard + bytes > max_shard_bytes) {
        shards.emplace_back();
        in_shard = 0;
      }
      shards.back().push_back(*nt);
      in_shard += bytes;
    }
    nlohmann::json weight_map = nlohmann::json::object();
    for (size_t i = 0; i < shards.size(); ++i) {
      std::string f = absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, shards.size());
      if (absl::Status s = WriteSafetensors((fs::path(dir) / f).string(), shards[i], metadata); !s.ok()) return s;
      for (const NamedTensor& nt : shards[i]) weight_map[nt.name] = f;
      stale.erase(f);
    }
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    if (absl::Status s = WriteFileAtomically((fs::path(dir) / kIndexFileName).string(), index.dump(2) + "\n"); !s.ok()) {
      return s;
    }
    stale.erase(kIndexFileName);
  }
  for (const std::string& f : stale) fs::remove(fs::path(dir) / f, ec);
  return absl::OkStatus();
}

}  // namespace flexfed
