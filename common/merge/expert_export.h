// Expert modules as tensors: taking the owner's expert out of a trained model (with the frozen-
// tensor check), writing a module, reading one. Format and validation: common/core/expert_module.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/checkpoint.h"
#include "common/core/expert_module.h"
#include "common/model/model.h"
#include "common/model/moe.h"
#include "common/model/router_embedding.h"

namespace flexfed {

struct ExpertTensors {
  std::vector<ExpertWeights> ffn;       // per layer
  std::vector<at::Tensor> router_rows;  // per layer [H] fp32
  std::vector<at::Tensor> router_bias;  // per layer [1] fp32, or empty when trained without bias
  std::optional<at::ScalarType> ffn_write_as;  // set: the FFN weights are converted to it as they are written
};

absl::Status WriteExpertModule(const std::string& path, const ExpertTensors& tensors,
                               const ExpertModuleMetadata& metadata);

// Takes the owner's expert out of its trained model, after checking that every tensor the owner
// must not change is bit-identical to the anchor's (embeddings, attention, norms, lm_head, expert 0,
// and router row 0 = r_pub); refuses, naming them, otherwise. `trained` is the two-expert model of
// `flexfed-owner train`, or the dense model of `train --dense`, whose router row then comes from
// `dense_router_row` (required in that case). The FFN weights stay the trained model's tensors
// (views of its mapped files) and are cast to the anchor's dtype as WriteExpertModule writes them,
// one at a time: exporting a 7B expert never holds it whole.
absl::StatusOr<ExpertTensors> ExtractExpert(const FlexOlmoModel& trained, const FlexOlmoModel& anchor,
                                            const RouterEmbedding& router_pub, const RouterEmbedding* dense_router_row);

// The tensors of a validated module.
absl::StatusOr<ExpertTensors> ReadExpertModule(const SafetensorsFile& file, int64_t num_layers);

}  // namespace flexfed
