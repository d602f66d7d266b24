#include "common/anchor.h"

#include <algorithm>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/sha256.h"

namespace flexfed {

namespace fs = std::filesystem;

absl::StatusOr<std::vector<AnchorFile>> AnchorManifest(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no such anchor directory; pull the anchor first"));
  }
  std::vector<AnchorFile> files;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!name.empty() && name[0] == '.') {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (!it->is_regular_file()) continue;
    absl::StatusOr<std::string> sha = Sha256File(it->path().string());
    if (!sha.ok()) return sha.status();
    files.push_back({fs::relative(it->path(), dir).string(), *sha, static_cast<uint64_t>(it->file_size())});
  }
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot list: ", ec.message()));
  std::sort(files.begin(), files.end(), [](const AnchorFile& a, const AnchorFile& b) { return a.name < b.name; });
  return files;
}

absl::StatusOr<std::string> AnchorId(const std::string& dir) {
  absl::StatusOr<std::vector<AnchorFile>> files = AnchorManifest(dir);
  if (!files.ok()) return files.status();
  Sha256 h;
  for (const AnchorFile& f : *files) h.Update(absl::StrCat(f.sha256, "  ", f.size, "  ", f.name, "\n"));
  return h.HexDigest();
}

absl::StatusOr<Anchor> LoadAnchor(const std::string& dir, bool require_router_pub, std::optional<at::ScalarType> dtype) {
  absl::StatusOr<std::string> id = AnchorId(dir);
  if (!id.ok()) return id.status();
  absl::StatusOr<FlexOlmoModel> model = FlexOlmoModel::Load(dir, dtype);
  if (!model.ok()) return model.status();
  const ModelConfig& c = model->config();
  if (c.num_experts != 1) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": an anchor is a dense model (olmo2, or flex_olmo with one "
                                                   "expert); this one has ", c.num_experts, " experts"));
  }
  Anchor anchor{dir, *id, *std::move(model), {}};
  const std::string pub = (fs::path(dir) / kRouterPubFileName).string();
  if (fs::exists(pub)) {
    absl::StatusOr<RouterEmbedding> r = ReadRouterEmbedding(pub, c.num_hidden_layers, c.hidden_size);
    if (!r.ok()) return r.status();
    anchor.router_pub = *std::move(r);
  } else if (require_router_pub) {
    return absl::NotFoundError(absl::StrCat(dir, ": no ", kRouterPubFileName,
                                            " (r_pub) beside the anchor; the coordinator publishes it with the anchor "
                                            "(an operator makes it with `flexfed-owner router-init` on public data)"));
  }
  return anchor;
}

}  // namespace flexfed
