// Release manifests (docs/ARCHITECTURE.md §3 step 5, §7): which experts a merged model holds, in router
// order, on which anchor, with which k. The coordinator writes one per `flexfedctl release build`
// and never changes it; `release export` checks every downloaded blob against it before merging.
// Torch-free: the coordinator and flexfedctl share it. Spec: docs/RELEASES.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include <nlohmann/json.hpp>

namespace flexfed {

inline constexpr char kReleaseFormat[] = "flexfed-release/1";
inline constexpr char kReleaseManifestFileName[] = "flexfed_release.json";

struct ReleaseExpert {
  int64_t index = 0;  // router row (1..E-1; 0 is the anchor's public expert)
  std::string expert_id;
  std::string owner_id;
  std::string name;
  std::string domain;
  std::string module_sha256;
  int64_t module_size = 0;
  int64_t tokens_trained = 0;
};

struct ReleaseManifest {
  std::string release_id;
  std::string anchor_id;
  std::vector<ReleaseExpert> experts;  // router order
  int64_t top_k = 0;                   // num_experts_per_tok, 1..num_experts()
  std::vector<std::string> excluded;   // active experts the operator left out (--exclude)
  int64_t created_unix = 0;
  std::string note;

  int64_t num_experts() const { return static_cast<int64_t>(experts.size()) + 1; }
  // Canonical JSON text (keys sorted, two-space indent, trailing newline): what is stored, hashed
  // and written next to an exported model.
  std::string ToJson() const;
  // Parses and checks a manifest (format, hex hashes, indices 1..n in order, 1 ≤ k ≤ E).
  static absl::StatusOr<ReleaseManifest> FromJson(const std::string& text, const std::string& source);
};

// "rel-0007": releases are numbered in the order they are built.
std::string ReleaseIdForNumber(int64_t number);
bool IsValidReleaseId(const std::string& id);

}  // namespace flexfed
