// libFuzzer target for release manifests (ReleaseManifest::FromJson, common/core/release.cpp): what
// a model user downloads beside an exported release, and what the server loads. An accepted
// manifest must hold what FromJson promises (indices 1..n in order, 1 <= k <= E) and survive its
// canonical round trip byte for byte.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/core/release.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<flexfed::ReleaseManifest> m = flexfed::ReleaseManifest::FromJson(text, "fuzz");
  if (!m.ok()) return 0;
  for (size_t i = 0; i < m->experts.size(); ++i) {
    if (m->experts[i].index != static_cast<int64_t>(i) + 1) std::abort();
  }
  if (m->top_k < 1 || m->top_k > m->num_experts()) std::abort();
  const std::string canonical = m->ToJson();
  absl::StatusOr<flexfed::ReleaseManifest> again = flexfed::ReleaseManifest::FromJson(canonical, "fuzz again");
  if (!again.ok() || again->ToJson() != canonical) std::abort();
  return 0;
}
