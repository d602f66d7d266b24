// Router embedding initialisation for an owner's expert (FLEXOLMO.md §3, "Router embedding init").
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "common/data.h"
#include "common/model.h"
#include "common/progress.h"
#include "common/router_embedding.h"

namespace flexfed {

struct RouterInitOptions {
  std::string mode = "anchor";  // anchor | vectors | random
  int64_t samples = 1000;       // documents sampled (anchor mode)
  uint64_t seed = 0;
  int64_t max_tokens = 512;
  double margin = 3.0;    // anchor mode: router logit margin D between the owner's and the public mean
  double boundary = 0.5;  // anchor mode: where between the public (0) and the owner's mean (1) routing flips     // tokens of each document used (anchor mode)
  std::string vectors;          // vectors mode: .npy or safetensors, [H] or [L, H]
};

// anchor: per layer, m = the mean over sampled documents of the mean hidden state entering that
//   layer, computed with the frozen anchor. For r_pub itself (public data, no router_pub yet):
//   r_pub = m / |m|, and m is kept as the layer's "center" c. For an owner: r_i = r_pub +
//   2D (m − c) / |m − c|²: the public row plus a step from the public data towards the owner's,
//   scaled so that the logit margin is D (`margin`) at either mean when the boundary is half-way
//   (`boundary` moves it towards the owner's mean: fewer foreign tokens reach the expert). Hidden states of all text share one large direction (cosines of 0.9–0.99 between
//   domain means in the demo's anchor), so rows made from raw means barely differ and route every
//   token alike; measured from the public center they differ by a unit step towards each domain,
//   which sends the owner's tokens to its expert and public tokens to expert 0 from the start;
//   scaling by the distance matters most in layer 0, where inputs are embeddings of norm ~0.3.
//   The owner's file also holds the initial negative bias that puts the routing boundary half-way
//   between the two means (without it, a domain whose hidden states are longer than the public
//   ones would take public tokens too).
//   r_pub has unit length: a raw mean's norm (tens) gives logits of hundreds, and the z-loss then
//   pushes the trained FFNs to shrink the hidden states.
// vectors: vectors computed elsewhere (e.g. GritLM embeddings), checked against the hidden size.
// random: N(0, 0.02²) per entry — for the ablation only (learned rows tend to collapse together).
// `corpus` is used by the anchor mode only.
// `router_pub`: the anchor's published r_pub (with its centers), or null when making r_pub itself.
absl::StatusOr<RouterEmbedding> InitRouterEmbedding(const FlexOlmoModel& anchor, const TokenCorpus* corpus,
                                                    const RouterInitOptions& options, ProgressReporter* progress,
                                                    const RouterEmbedding* router_pub = nullptr);

}  // namespace flexfed
