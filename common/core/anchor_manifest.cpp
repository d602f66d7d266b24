#include "common/core/anchor_manifest.h"

#include <algorithm>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/core/sha256.h"

namespace flexfed {

namespace fs = std::filesystem;

namespace {

void SortByName(std::vector<AnchorFile>& files) {
  std::sort(files.begin(), files.end(), [](const AnchorFile& a, const AnchorFile& b) { return a.name < b.name; });
}

}  // namespace

absl::Status CheckAnchorFiles(const std::vector<AnchorFile>& files) {
  if (files.size() > kMaxAnchorFiles) {
    return absl::InvalidArgumentError(absl::StrCat("an anchor of ", files.size(), " files; at most ", kMaxAnchorFiles));
  }
  std::vector<std::string> names;
  for (const AnchorFile& f : files) {
    const std::string& n = f.name;
    auto bad = [&](const char* why) {
      return absl::InvalidArgumentError(absl::StrCat("anchor file name '", absl::CHexEscape(n), "' ", why,
                                                     "; anchor files are plain relative paths inside the anchor directory"));
    };
    if (n.empty() || n.size() > 255) return bad("is empty or longer than 255 bytes");
    if (n[0] == '/') return bad("is absolute");
    if (std::any_of(n.begin(), n.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f || c == '\\'; })) {
      return bad("holds a control character or a backslash");
    }
    for (size_t begin = 0; begin <= n.size();) {
      size_t end = n.find('/', begin);
      if (end == std::string::npos) end = n.size();
      const std::string_view part(n.data() + begin, end - begin);
      if (part.empty()) return bad("has an empty part");
      if (part[0] == '.') return bad("has a part that starts with '.'");
      begin = end + 1;
    }
    if (f.sha256.size() != 64 ||
        !std::all_of(f.sha256.begin(), f.sha256.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); })) {
      return absl::InvalidArgumentError(absl::StrCat("anchor file '", n, "': '", absl::CHexEscape(f.sha256),
                                                     "' is not a SHA-256 (64 lowercase hex digits)"));
    }
    names.push_back(n);
  }
  std::sort(names.begin(), names.end());
  if (auto twice = std::adjacent_find(names.begin(), names.end()); twice != names.end()) {
    return absl::InvalidArgumentError(absl::StrCat("anchor file '", *twice, "' is listed twice; each file once"));
  }
  return absl::OkStatus();
}

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
