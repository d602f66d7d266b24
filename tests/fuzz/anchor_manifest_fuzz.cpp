// libFuzzer target for an anchor's file list (CheckAnchorFiles, common/core/anchor_manifest.cpp):
// what an operator publishes and what an owner's client is told to write. The input is the
// manifest's text, one "<sha256>  <size>  <name>" line per file (the form AnchorIdOf hashes). An
// accepted list must only name paths inside the anchor directory, each once, and have one id
// whatever its order.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "common/core/anchor_manifest.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<flexfed::AnchorFile> files;
  for (size_t begin = 0; begin < text.size();) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(begin, end - begin);
    begin = end + 1;
    const size_t a = line.find("  "), b = a == std::string::npos ? a : line.find("  ", a + 2);
    if (b == std::string::npos) return 0;
    flexfed::AnchorFile f;
    f.sha256 = line.substr(0, a);
    f.size = std::strtoull(line.substr(a + 2, b - a - 2).c_str(), nullptr, 10);
    f.name = line.substr(b + 2);
    files.push_back(f);
  }
  if (!flexfed::CheckAnchorFiles(files).ok()) return 0;
  const std::filesystem::path root("/anchor");
  std::set<std::string> seen;
  for (const flexfed::AnchorFile& f : files) {
    const std::string resolved = (root / f.name).lexically_normal().string();
    if (resolved.rfind("/anchor/", 0) != 0 || resolved.size() <= 8 || !seen.insert(resolved).second) std::abort();
  }
  std::vector<flexfed::AnchorFile> reversed(files.rbegin(), files.rend());
  if (flexfed::AnchorIdOf(files) != flexfed::AnchorIdOf(reversed)) std::abort();
  return 0;
}
