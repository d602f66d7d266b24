// The expert module: the only thing an owner's premises ever send (ARCHITECTURE.md §7). One
// safetensors file with, per layer, the trained expert's FFN, its router row and (optionally) its
// negative bias, plus metadata binding it to one anchor. Spec: docs/EXPERT_MODULE.md.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/checkpoint.h"
#include "common/model_config.h"
#include "common/model.h"
#include "common/moe.h"
#include "common/router_embedding.h"

namespace flexfed {

inline constexpr char kExpertModuleFormat[] = "flexfed-expert-module";
inline constexpr char kExpertModuleVersion[] = "1";
// Why a module was refused, as the payload "flexfed.reason" of the error status (for metrics and
// audit): format, missing_tensor, unexpected_tensor, shape, dtype, non_finite, metadata,
// anchor_mismatch, config_mismatch.
inline constexpr char kRejectionPayload[] = "flexfed.reason";
std::string RejectionReason(const absl::Status& status);

struct ExpertModuleMetadata {
  std::string anchor_sha256;  // AnchorId() of the anchor it was trained against
  std::string config_hash;    // ConfigHash() of that anchor's config
  std::string owner;
  std::string expert_name;
  std::string domain;
  int64_t tokens_trained = 0;
  std::string router_init;  // anchor | vectors | random
};

struct ExpertTensors {
  std::vector<ExpertWeights> ffn;       // per layer
  std::vector<at::Tensor> router_rows;  // per layer [H] fp32
  std::vector<at::Tensor> router_bias;  // per layer [1] fp32, or empty when trained without bias
};

// SHA-256 of the fields of `config` that decide an expert's shapes and meaning.
std::string ConfigHash(const ModelConfig& config);

struct AllowedTensor {
  std::string name;
  Dtype dtype;
  std::vector<int64_t> shape;
};
// Every tensor a module for an anchor of `config` with weights of `ffn_dtype` holds, in order;
// the bias tensors (`layers.L.router.bias`) are all present or all absent.
std::vector<AllowedTensor> ExpertModuleAllowList(const ModelConfig& config, Dtype ffn_dtype, bool with_bias);

absl::Status WriteExpertModule(const std::string& path, const ExpertTensors& tensors,
                               const ExpertModuleMetadata& metadata);

// Checks a module against the allow-list of `config` — exact names, dtypes and shapes, nothing
// else — finite values, complete metadata and, when given, the anchor id. Returns the metadata.
absl::StatusOr<ExpertModuleMetadata> ValidateExpertModule(const SafetensorsFile& file, const ModelConfig& config,
                                                          Dtype ffn_dtype, const std::string& expected_anchor_sha256 = "");

// Takes the owner's expert out of its trained model, after checking that every tensor the owner
// must not change is bit-identical to the anchor's (embeddings, attention, norms, lm_head, expert 0,
// and router row 0 = r_pub); refuses, naming them, otherwise. `trained` is the two-expert model of
// `flexfed-owner train`, or the dense model of `train --dense`, whose router row then comes from
// `dense_router_row` (required in that case). FFN weights are cast to the anchor's dtype.
absl::StatusOr<ExpertTensors> ExtractExpert(const FlexOlmoModel& trained, const FlexOlmoModel& anchor,
                                            const RouterEmbedding& router_pub, const RouterEmbedding* dense_router_row);

// The tensors of a validated module.
absl::StatusOr<ExpertTensors> ReadExpertModule(const SafetensorsFile& file, int64_t num_layers);

}  // namespace flexfed
