// Router embeddings: one vector per layer that routes tokens to an expert (docs/METHOD.md §3).
// The file format (also of the anchor's r_pub, `router_pub.safetensors`) is in docs/EXPERT_MODULE.md:
// tensors `layers.L.router.weight` F32 [H] (in r_pub files also `layers.L.router.center` F32 [H]; in
// owners' anchor-mode files also `layers.L.router.bias` F32 [1], the initial negative bias),
// metadata `mode`, `documents`, `seed`.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

struct RouterEmbedding {
  std::vector<at::Tensor> rows;  // per layer [H] fp32
  // r_pub files only: per layer, the anchor's raw mean hidden state on the public data, from which
  // owners' anchor-mode embeddings are measured (common/train/router_init.h). Empty otherwise.
  std::vector<at::Tensor> centers;
  // Owners' anchor-mode files only: per layer [1], the negative bias training starts from.
  std::vector<at::Tensor> biases;
  std::map<std::string, std::string> metadata;
};

inline constexpr char kRouterPubFileName[] = "router_pub.safetensors";

absl::StatusOr<RouterEmbedding> ReadRouterEmbedding(const std::string& path, int64_t num_layers, int64_t hidden);
absl::Status WriteRouterEmbedding(const std::string& path, const RouterEmbedding& embedding);

// Vectors made elsewhere (e.g. GritLM embeddings of the owner's documents, computed offline):
// `.npy` (little-endian f4/f8/f2, C order) or safetensors (a single tensor, or `vectors`), shaped
// [H] (the same vector for every layer) or [L, H] (one per layer).
absl::StatusOr<RouterEmbedding> ReadExternalVectors(const std::string& path, int64_t num_layers, int64_t hidden);

// A .npy file as a CPU tensor (float16/32/64, C order, little-endian), validated.
absl::StatusOr<at::Tensor> ReadNpy(const std::string& path);

}  // namespace flexfed
