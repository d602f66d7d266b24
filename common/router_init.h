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
  int64_t max_tokens = 512;     // tokens of each document used (anchor mode)
  std::string vectors;          // vectors mode: .npy or safetensors, [H] or [L, H]
};

// anchor: per layer, the mean over sampled documents of the mean hidden state entering that layer,
//   computed with the frozen anchor and scaled to unit length (the same recipe gives the anchor's
//   own r_pub on public data).
// vectors: vectors computed elsewhere (e.g. GritLM embeddings), checked against the hidden size.
// random: N(0, 0.02²) per entry — for the ablation only (learned rows tend to collapse together).
// `corpus` is used by the anchor mode only.
absl::StatusOr<RouterEmbedding> InitRouterEmbedding(const FlexOlmoModel& anchor, const TokenCorpus* corpus,
                                                    const RouterInitOptions& options, ProgressReporter* progress);

}  // namespace flexfed
