// Router embedding initialisation for an owner's expert (docs/METHOD.md §3, "Router embedding init").
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/train/data.h"
#include "common/model/model.h"
#include "common/core/progress.h"
#include "common/model/router_embedding.h"

namespace flexfed {

struct RouterInitOptions {
  std::string mode = "anchor";  // anchor | vectors | random
  int64_t samples = 1000;       // documents sampled (anchor mode)
  uint64_t seed = 0;
  int64_t max_tokens = 512;     // tokens of each document used (anchor mode)
  double margin = 3.0;          // anchor mode: router logit margin D at the owner's mean
  double boundary = 0.5;        // anchor mode: where routing flips, 0 = the public mean, 1 = the owner's
  std::string vectors;          // vectors mode: .npy or safetensors, [H] or [L, H]
  // anchor mode, owners: public text to calibrate the negative bias on (issue #14, D2). Each
  // layer's bias is set so that a fraction `public_share` of the public tokens sampled (as many
  // documents and tokens as for the owner's mean) would go to this expert at initialisation —
  // a selective "mine vs not mine" decision measured on public data rather than put half-way
  // between two means. Without it, the bias comes from `boundary`.
  const TokenCorpus* public_corpus = nullptr;
  double public_share = 0.05;
};

// anchor: per layer, m = the mean over sampled documents of the mean of what that layer's router
//   sees (the residual stream after the layer's attention), computed with the frozen anchor.
//   (Before 2026-11-25 it averaged the stream entering the layer, before attention: in layer 0
//   that is the bare embedding, far smaller than what the router is given, so rows made from it
//   saturated there.)
//   - For r_pub itself (public data, `router_pub` null): r_pub = 0, and m is kept as the layer's
//     center c. Zero, not a direction: routing depends only on differences of logits, and any
//     shared r_pub adds the same offset h·r_pub to every expert's logit (|c| = 20–26 in the demo's
//     anchor with the earlier unit r_pub = m/|m|), which only feeds the router z-loss
//     (docs/METHOD.md). Anchors published with a unit r_pub keep working: owner rows add to it.
//   - For an owner: r_i = r_pub + v with v = 2D (m − c) / (|m − c| · max(|m − c|, |c| / 4)), and an
//     initial bias b = −v·(c + f (m − c)) (kept only if ≤ 0). Then logit(i) − logit(pub) = h·v + b
//     is 0 at the fraction f (`boundary`) of the way from c to m and 2D(1 − f) at m (less where the
//     floor applies). Why: hidden
//     states of all text share one large direction (cosine 0.88–0.99 between the public and the
//     code or scripture means in the demo's anchor), so rows from raw means route every token
//     alike. The floor on the distance keeps v bounded where the means nearly coincide (layer 0,
//     whose inputs are single-token embeddings): otherwise logits saturate and the row's
//     gradient is exactly 0.
// vectors: vectors computed elsewhere (e.g. GritLM embeddings), checked against the hidden size.
// random: N(0, 0.02²) per entry — for the ablation only (learned rows tend to collapse together).
// `corpus` is used by the anchor mode only.
// `router_pub`: the anchor's published r_pub (with its centers), or null when making r_pub itself.
absl::StatusOr<RouterEmbedding> InitRouterEmbedding(const FlexOlmoModel& anchor, const TokenCorpus* corpus,
                                                    const RouterInitOptions& options, ProgressReporter* progress,
                                                    const RouterEmbedding* router_pub = nullptr);

}  // namespace flexfed
