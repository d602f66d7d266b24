// The anchor's manifest and identity (docs/ARCHITECTURE.md §3): which files an anchor directory
// holds and the one SHA-256 that names it. Torch-free: the coordinator computes the same id from
// the uploaded blobs that an owner computes from its copy of the directory.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

struct AnchorFile {
  std::string name;    // relative to the anchor directory
  std::string sha256;  // of the file's bytes
  uint64_t size = 0;
};

// Checks an anchor's file list before anything uses it (the coordinator at PublishAnchor, an owner
// before it writes what the coordinator lists): each name a plain relative path of 1–255 bytes that
// stays inside the anchor directory — no absolute path, no empty, `.` or `..` part, no part that
// starts with `.` (AnchorManifest skips those, so the ids could never agree), no backslash, no
// control character — and no name twice; each SHA-256 64 lowercase hex digits; at most
// kMaxAnchorFiles files. The error names the first bad entry.
inline constexpr size_t kMaxAnchorFiles = 4096;
absl::Status CheckAnchorFiles(const std::vector<AnchorFile>& files);

// Every regular file of `dir` (recursively, hidden ones skipped), sorted by name, hashed.
absl::StatusOr<std::vector<AnchorFile>> AnchorManifest(const std::string& dir);

// The anchor's identity: SHA-256 of its manifest text ("<sha256>  <size>  <name>\n" per file, in
// name order). Any change to any file changes it; renaming the directory does not. `files` need
// not be sorted.
std::string AnchorIdOf(std::vector<AnchorFile> files);

// AnchorIdOf(AnchorManifest(dir)).
absl::StatusOr<std::string> AnchorId(const std::string& dir);

}  // namespace flexfed
