#include "common/core/anchor_manifest.h"

#include <algorithm>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/core/sha256.h"

namespace flexfed {

namespace fs = std::filesystem;

namespace {

void SortByName(std::vector<AnchorFile>& files) {
  std::sort(files.begin(), files.end(), [](const AnchorFile& a, const AnchorFile& b) { return a.name < b.name; });
}

}  // namespace

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
  SortByName(files);
  return files;
}

std::string AnchorIdOf(std::vector<AnchorFile> files) {
  SortByName(files);
  Sha256 h;
  for (const AnchorFile& f : files) h.Update(absl::StrCat(f.sha256, "  ", f.size, "  ", f.name, "\n"));
  return h.HexDigest();
}

absl::StatusOr<std::string> AnchorId(const std::string& dir) {
  absl::StatusOr<std::vector<AnchorFile>> files = AnchorManifest(dir);
  if (!files.ok()) return files.status();
  return AnchorIdOf(*std::move(files));
}

}  // namespace flexfed
