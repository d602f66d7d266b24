// Hugging Face `config.json` for `olmo2` (dense) and `flex_olmo` (mixture of experts) models.
// Which fields FlexFed reads, which it passes through and which it refuses: docs/CHECKPOINTS.md.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include <nlohmann/json.hpp>

namespace flexfed {

struct ModelConfig {
  std::string model_type = "flex_olmo";  // "olmo2" or "flex_olmo"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 4096;
  double rope_theta = 500000.0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  // Mixture of experts. An olmo2 model is the one-expert case: E = k = 1.
  int64_t num_experts = 1;
  int64_t num_experts_per_tok = 1;
  bool norm_topk_prob = false;
  std::optional<int64_t> pad_token_id;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // config.json may hold one id or a list
  bool eos_is_list = false;
  std::string torch_dtype = "float32";  // float32 | bfloat16 | float16
  bool rope_as_parameters = false;      // write `rope_parameters` (newer HF) instead of `rope_theta`
  // Fields FlexFed does not use but keeps so a config survives a round trip (architectures, ...).
  nlohmann::json passthrough = nlohmann::json::object();

  bool is_moe() const { return model_type == "flex_olmo"; }

  // Checks every field and the relations between them (heads divide, k ≤ E, ...).
  absl::Status Validate() const;

  // `source` names the file in error messages.
  static absl::StatusOr<ModelConfig> FromJson(const nlohmann::json& j, const std::string& source);
  nlohmann::json ToJson() const;

  // The sizes of docs/ARCHITECTURE.md §8: test, tiny, small, 1b, 7b. Dense (olmo2) unless
  // `num_experts` > 1, in which case the result is flex_olmo with `top_k` experts per token.
  static absl::StatusOr<ModelConfig> Preset(const std::string& name, int64_t num_experts = 1, int64_t top_k = 1);
};

absl::StatusOr<ModelConfig> ReadModelConfig(const std::string& path);
absl::Status WriteModelConfig(const std::string& path, const ModelConfig& config);

}  // namespace flexfed
