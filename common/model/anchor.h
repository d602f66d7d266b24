// The anchor: the frozen public model every owner trains against (docs/ARCHITECTURE.md §3). An anchor
// directory holds an HF checkpoint (olmo2, or flex_olmo with one expert), `router_pub.safetensors`
// (r_pub, one router vector per layer) and optionally `flexfed_tokenizer.json`. Its manifest and id:
// common/core/anchor_manifest.h.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/core/anchor_manifest.h"
#include "common/model/model.h"
#include "common/model/router_embedding.h"

namespace flexfed {

struct Anchor {
  std::string dir;
  std::string id;
  FlexOlmoModel model;       // the public model, dense (one expert)
  RouterEmbedding router_pub;  // r_pub, per layer
};

// Loads and checks an anchor directory. `require_router_pub` = false serves router-init of r_pub
// itself (the operator computes r_pub with the anchor before publishing it).
// Weights load as `dtype` (default: the checkpoint's).
absl::StatusOr<Anchor> LoadAnchor(const std::string& dir, bool require_router_pub = true,
                                  std::optional<at::ScalarType> dtype = std::nullopt);

}  // namespace flexfed
