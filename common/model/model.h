// The FlexOlmo causal language model (HF `flex_olmo`; a dense `olmo2` model is its one-expert case).
// The forward pass is exactly docs/METHOD.md §2; tensor names are HF's (see
// docs/CHECKPOINTS.md). Weights are plain tensors keyed by those names, so load, save, freezing and
// optimizers all work from one list (NamedParameters()).
//
// Dimensions: B=batch, T=new tokens, S=keys (past + new), N=B·T tokens, H=hidden, F=FFN width,
// E=experts, K=experts per token, Q=attention heads, G=key/value heads, D=head dim, V=vocab.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/checkpoint.h"
#include "common/core/model_config.h"
#include "common/model/moe.h"

namespace flexfed {

struct LayerWeights {
  at::Tensor q_proj, k_proj, v_proj;  // [Q·D, H], [G·D, H], [G·D, H]
  at::Tensor o_proj;                  // [H, Q·D]
  at::Tensor q_norm, k_norm;          // [Q·D], [G·D]: RMSNorm over the full projection
  at::Tensor post_attention_layernorm, post_feedforward_layernorm;  // [H]
  at::Tensor router;       // [E, H], row e = router embedding of expert e; undefined when dense
  at::Tensor router_bias;  // [E] FlexFed extra (negative bias, docs/METHOD.md §3); undefined = none
  std::vector<ExpertWeights> experts;  // E entries; expert 0 is the public (anchor) FFN
};

// Which experts a forward may route to (opt-out at inference). Empty = all.
struct Routing {
  std::vector<bool> allowed;  // size E when set

  static Routing All() { return {}; }
  // All experts but those listed. Expert ids must be < num_experts.
  static Routing Excluding(int64_t num_experts, const std::vector<int64_t>& excluded);
  static Routing Only(int64_t num_experts, const std::vector<int64_t>& allowed);
  // From a command line's --exclude / --allow lists (at most one non-empty): checks that the ids
  // exist and that at least one expert remains.
  static absl::StatusOr<Routing> FromLists(int64_t num_experts, const std::vector<int64_t>& exclude,
                                           const std::vector<int64_t>& allow);
};

// Keys and values of past positions for incremental decoding. Allocated once at full capacity;
// Forward() appends T positions per call. Use only with gradients off.
struct KvCache {
  std::vector<at::Tensor> keys;    // per layer [B, G, capacity, D]
  std::vector<at::Tensor> values;  // per layer [B, G, capacity, D]
  int64_t length = 0;              // positions filled
  int64_t capacity() const { return keys.empty() ? 0 : keys[0].size(2); }
};

// Optional per-layer outputs of a forward, for routing analysis, router z-loss and router init.
struct ForwardTrace {
  bool want_layer_inputs = false;
  std::vector<at::Tensor> layer_inputs;    // [B, T, H] hidden state entering each layer
  bool want_router_inputs = false;
  std::vector<at::Tensor> router_inputs;   // [B, T, H] what each layer's router sees (after attention)
  std::vector<at::Tensor> router_logits;   // [N, E] fp32, after bias and opt-out mask (MoE only)
  std::vector<at::Tensor> expert_indices;  // [N, K] int64, experts chosen per token (MoE only)
  // Expert `ffn_expert`'s activations per layer (-1 = none), for per-sequence gradient norms;
  // the forward then takes the LibTorch path even where the CUDA kernels would run.
  int64_t ffn_expert = -1;
  std::vector<FfnActivations> ffn;
};

class FlexOlmoModel {
 public:
  // Fresh weights: N(0, 0.02) for matrices and router, ones for norms; deterministic in `seed`.
  static absl::StatusOr<FlexOlmoModel> Create(const ModelConfig& config, at::ScalarType dtype, uint64_t seed,
                                              bool with_router_bias = false);

  // A model from weights already in hand (shared, not copied): `layers` must hold every tensor the
  // config calls for, with the right shapes; router_bias may be set or not.
  static absl::StatusOr<FlexOlmoModel> Assemble(const ModelConfig& config, at::Tensor embed_tokens,
                                                std::vector<LayerWeights> layers, at::Tensor norm, at::Tensor lm_head);

  // Loads a checkpoint directory: config.json + safetensors (single or sharded) + the optional
  // FlexFed extras file. Weights are stored as `dtype` (default: the checkpoint's torch_dtype).
  // On CPU with a matching dtype the weights are zero-copy views of the mapped files.
  static absl::StatusOr<FlexOlmoModel> Load(const std::string& dir,
                                            std::optional<at::ScalarType> dtype = std::nullopt);

  // Writes config.json (torch_dtype = this model's dtype) and the weights with HF names; the
  // negative router biases, which HF checkpoints cannot carry, go to kExtrasFileName.
  absl::Status Save(const std::string& dir, uint64_t max_shard_bytes = kDefaultMaxShardBytes) const;

  // The residual stream is carried in the norms' dtype: the model's own, or fp32 where training
  // keeps frozen matrices in bf16 beside fp32 norms (common/train/training.h).
  // ids: [B, T] int64 → logits [B, T, V] in the weight dtype. With `cache`, the ids continue the
  // cached positions (cache->length grows by T); without, positions start at 0.
  at::Tensor Forward(const at::Tensor& ids, const Routing& routing = {}, KvCache* cache = nullptr,
                     ForwardTrace* trace = nullptr) const;

  // Forward without the output head: the final norm's output [B, T, H], for a loss that applies the
  // head itself a chunk at a time (common/train/cross_entropy.h). Forward = linear(this, lm_head()).
  at::Tensor ForwardHidden(const at::Tensor& ids, const Routing& routing = {}, KvCache* cache = nullptr,
                           ForwardTrace* trace = nullptr) const;

  // One decoder layer with weights `w` (the model's own layers()[layer], or stand-ins of the same
  // shapes): h [B, T, H] → h + norm(attention(h)) → + norm(FFN or MoE). For ForwardHidden and for
  // recomputing a checkpointed layer (common/model/layer_checkpoint.h).
  at::Tensor DecoderLayer(int64_t layer, const LayerWeights& w, const at::Tensor& h, int64_t past, KvCache* cache,
                          const at::Tensor& routing_mask, int64_t top_k, ForwardTrace* trace) const;

  // Activation checkpointing: a forward that records a graph keeps only each layer's input and
  // recomputes the layer during the backward (one layer's activations alive at a time), for the
  // price of a second forward. Off by default. Forwards that record the trained FFN's activations
  // (ForwardTrace::ffn_expert), the router inputs, or use a KV cache are never checkpointed.
  void set_activation_checkpointing(bool on) { checkpoint_layers_ = on; }
  bool activation_checkpointing() const { return checkpoint_layers_; }

  KvCache NewCache(int64_t batch, int64_t capacity) const;

  // Every weight under its HF name (dense olmo2 names for olmo2 models), in a fixed order.
  // The tensors are the model's own: changing them changes the model.
  std::vector<NamedTensor> NamedParameters() const;

  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return embed_tokens_.scalar_type(); }
  at::Device device() const { return embed_tokens_.device(); }
  // Moves every weight (and the RoPE tables) to `device`.
  void To(at::Device device);

  const at::Tensor& embed_tokens() const { return embed_tokens_; }
  const at::Tensor& norm() const { return norm_; }
  const at::Tensor& lm_head() const { return lm_head_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  std::vector<LayerWeights>& mutable_layers() { return layers_; }

  static constexpr char kExtrasFileName[] = "flexfed_extras.safetensors";

 private:
  FlexOlmoModel() = default;
  void BuildRope();
  at::Tensor Attention(int64_t layer, const LayerWeights& w, const at::Tensor& x, int64_t past, KvCache* cache) const;
  at::Tensor Moe(const LayerWeights& w, const at::Tensor& x, const at::Tensor& routing_mask, int64_t top_k,
                 ForwardTrace* trace) const;

  ModelConfig config_;
  at::Tensor embed_tokens_;  // [V, H]
  std::vector<LayerWeights> layers_;
  at::Tensor norm_;     // [H]
  at::Tensor lm_head_;  // [V, H]; the same tensor as embed_tokens_ when tied
  at::Tensor rope_cos_, rope_sin_;  // [max_position_embeddings, D] fp32
  bool checkpoint_layers_ = false;
};

// Names a model of `config` has, in NamedParameters() order (what a checkpoint must hold).
std::vector<std::string> ExpectedTensorNames(const ModelConfig& config, bool with_router_bias);

// Writes a checkpoint directory (config.json + safetensors shards + index) of `config` with fresh
// weights drawn as Create() draws them — N(0, 0.02) matrices, ones for norms — in `dtype`,
// deterministic in `seed` (each tensor from its own generator, so the values do not depend on the
// sharding; they differ from Create()'s). The model is never held: one shard is drawn, written and
// freed at a time, so memory stays near `max_shard_bytes` whatever the model's size. The directory
// must not exist; it appears complete or not at all. For running FlexFed at a real model's size
// before its weights are at hand (`flexfedctl random-checkpoint`, the real-size tests and benchmark).
absl::Status WriteRandomCheckpoint(const std::string& dir, const ModelConfig& config, at::ScalarType dtype,
                                   uint64_t seed, uint64_t max_shard_bytes = kDefaultMaxShardBytes);

// Sets LibTorch's intra-op CPU threads: `threads`, or every core when 0.
void SetCpuThreads(int threads);

at::ScalarType ScalarTypeOf(const std::string& torch_dtype);  // "bfloat16" → kBFloat16, ...
std::string TorchDtypeName(at::ScalarType type);               // kBFloat16 → "bfloat16", ...

}  // namespace flexfed
