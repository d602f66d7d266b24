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

// Every regular file of `dir` (recursively, hidden ones skipped), sorted by name, hashed.
absl::StatusOr<std::vector<AnchorFile>> AnchorManifest(const std::string& dir);

// The anchor's identity: SHA-256 of its manifest text ("<sha256>  <size>  <name>\n" per file, in
// name order). Any change to any file changes it; renaming the directory does not. `files` need
// not be sorted.
std::string AnchorIdOf(std::vector<AnchorFile> files);

// AnchorIdOf(AnchorManifest(dir)).
absl::StatusOr<std::string> AnchorId(const std::string& dir);

}  // namespace flexfed
