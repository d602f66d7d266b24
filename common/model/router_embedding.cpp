#include "common/model/router_embedding.h"

#include <cmath>
#include <cstring>
#include <regex>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/model/checkpoint.h"
#include "common/core/file_util.h"

namespace flexfed {
namespace {

std::string RowName(int64_t layer) { return absl::StrCat("layers.", layer, ".router.weight"); }
std::string CenterName(int64_t layer) { return absl::StrCat("layers.", layer, ".router.center"); }
std::string BiasName(int64_t layer) { return absl::StrCat("layers.", layer, ".router.bias"); }

absl::StatusOr<RouterEmbedding> FromMatrix(const std::string& path, at::Tensor t, int64_t num_layers, int64_t hidden) {
  if (!at::isFloatingType(t.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": router vectors must be floating point"));
  }
  t = t.to(at::kFloat);
  const std::string given = ShapeString(t.sizes().vec());
  if (t.dim() == 1 && t.size(0) == hidden) t = t.unsqueeze(0).expand({num_layers, t.size(0)});
  if (t.dim() != 2 || t.size(1) != hidden || t.size(0) != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": vectors of shape ", given,
                                                   " do not fit the model: give [", hidden, "] or [", num_layers, ", ",
                                                   hidden, "] (the hidden size, optionally one per layer)"));
  }
  if (!at::isfinite(t).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": vectors hold NaN or infinity"));
  }
  RouterEmbedding e;
  for (int64_t l = 0; l < num_layers; ++l) e.rows.push_back(t[l].clone());
  return e;
}

}  // namespace

absl::StatusOr<RouterEmbedding> ReadRouterEmbedding(const std::string& path, int64_t num_layers, int64_t hidden) {
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  RouterEmbedding e;
  e.metadata = (*file)->metadata();
  for (int64_t l = 0; l < num_layers; ++l) {
    absl::StatusOr<at::Tensor> row = (*file)->Get(RowName(l));
    if (!row.ok() || row->dim() != 1 || row->size(0) != hidden) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": needs '", RowName(l), "' of shape [", hidden,
                                                     "]; make it with `flexfed-owner router-init`"));
    }
    e.rows.push_back(row->to(at::kFloat).clone());
    if ((*file)->Contains(CenterName(l))) {
      absl::StatusOr<at::Tensor> center = (*file)->Get(CenterName(l));
      if (!center.ok() || center->dim() != 1 || center->size(0) != hidden) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": '", CenterName(l), "' must have shape [", hidden, "]"));
      }
      e.centers.push_back(center->to(at::kFloat).clone());
    }
    if ((*file)->Contains(BiasName(l))) {
      absl::StatusOr<at::Tensor> bias = (*file)->Get(BiasName(l));
      if (!bias.ok() || bias->numel() != 1 || !std::isfinite(bias->to(at::kFloat).item<float>()) || bias->to(at::kFloat).item<float>() > 0) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": '", BiasName(l), "' must be one finite value ≤ 0"));
      }
      e.biases.push_back(bias->to(at::kFloat).reshape({1}).clone());
    }
  }
  if (!e.biases.empty() && static_cast<int64_t>(e.biases.size()) != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": has router biases for some layers only"));
  }
  if (!e.centers.empty() && static_cast<int64_t>(e.centers.size()) != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": has router centers for some layers only"));
  }
  if ((*file)->Names().size() != static_cast<size_t>(num_layers) + e.centers.size() + e.biases.size()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": holds ", (*file)->Names().size(), " tensors; expected one router row",
                                                   e.centers.empty() ? "" : " and one center", " for each of ", num_layers, " layers"));
  }
  return e;
}

absl::Status WriteRouterEmbedding(const std::string& path, const RouterEmbedding& embedding) {
  std::vector<NamedTensor> tensors;
  for (size_t l = 0; l < embedding.rows.size(); ++l) {
    tensors.push_back({RowName(static_cast<int64_t>(l)), embedding.rows[l].detach().to(at::kCPU, at::kFloat).contiguous()});
  }
  for (size_t l = 0; l < embedding.biases.size(); ++l) {
    tensors.push_back({BiasName(static_cast<int64_t>(l)), embedding.biases[l].detach().to(at::kCPU, at::kFloat).reshape({1}).contiguous()});
  }
  for (size_t l = 0; l < embedding.centers.size(); ++l) {
    tensors.push_back({CenterName(static_cast<int64_t>(l)), embedding.centers[l].detach().to(at::kCPU, at::kFloat).contiguous()});
  }
  return WriteSafetensors(path, tensors, embedding.metadata);
}

absl::StatusOr<at::Tensor> ReadNpy(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFile(path);
  if (!bytes.ok()) return bytes.status();
  const std::string& b = *bytes;
  auto bad = [&](const std::string& why) { return absl::InvalidArgumentError(absl::StrCat(path, ": ", why)); };
  if (b.size() < 10 || b.compare(0, 6, "\x93NUMPY") != 0) return bad("not a .npy file");
  const int major = static_cast<uint8_t>(b[6]);
  size_t header_len, header_at;
  if (major == 1) {
    header_len = static_cast<uint8_t>(b[8]) | (static_cast<size_t>(static_cast<uint8_t>(b[9])) << 8);
    header_at = 10;
  } else if (major == 2 || major == 3) {
    if (b.size() < 12) return bad("truncated .npy header");
    header_len = 0;
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(b[8 + i]);
    header_at = 12;
  } else {
    return bad(absl::StrCat(".npy format version ", major, " is not supported"));
  }
  if (header_at + header_len > b.size()) return bad("truncated .npy header");
  const std::string header = b.substr(header_at, header_len);
  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'descr':\\s*'([<|=])([fi])(\\d)'"))) {
    return bad("unsupported dtype (give little-endian float16, float32 or float64)");
  }
  const char kind = m[2].str()[0];
  const int width = std::stoi(m[3].str());
  at::ScalarType type;
  if (kind == 'f' && width == 4) {
    type = at::kFloat;
  } else if (kind == 'f' && width == 8) {
    type = at::kDouble;
  } else if (kind == 'f' && width == 2) {
    type = at::kHalf;
  } else {
    return bad("unsupported dtype (give little-endian float16, float32 or float64)");
  }
  if (header.find("'fortran_order': False") == std::string::npos) return bad("Fortran-order arrays are not supported; save with C order");
  if (!std::regex_search(header, m, std::regex("'shape':\\s*\\(([^)]*)\\)"))) return bad("no shape in the header");
  std::vector<int64_t> shape;
  const std::string dims = m[1].str();
  const std::regex number("\\d+");
  for (std::sregex_iterator it(dims.begin(), dims.end(), number), end; it != end; ++it) {
    shape.push_back(std::stoll(it->str()));
  }
  const size_t data_at = header_at + header_len;
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (b.size() - data_at != static_cast<size_t>(numel) * width) {
    return bad(absl::StrCat("data holds ", b.size() - data_at, " bytes, shape needs ", numel * width));
  }
  at::Tensor t = at::empty(shape, type);
  std::memcpy(t.data_ptr(), b.data() + data_at, b.size() - data_at);
  return t;
}

absl::StatusOr<RouterEmbedding> ReadExternalVectors(const std::string& path, int64_t num_layers, int64_t hidden) {
  at::Tensor t;
  if (path.size() >= 4 && path.compare(path.size() - 4, 4, ".npy") == 0) {
    absl::StatusOr<at::Tensor> npy = ReadNpy(path);
    if (!npy.ok()) return npy.status();
    t = *npy;
  } else {
    absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(path);
    if (!file.ok()) return file.status();
    std::vector<std::string> names = (*file)->Names();
    std::string name = (*file)->Contains("vectors") ? "vectors" : (names.size() == 1 ? names[0] : "");
    if (name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": holds several tensors; name the one to use 'vectors'"));
    }
    t = *(*file)->Get(name);
  }
  return FromMatrix(path, t, num_layers, hidden);
}

}  // namespace flexfed
