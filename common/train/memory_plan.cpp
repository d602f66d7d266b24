#include "common/train/memory_plan.h"

#include <algorithm>
#include <atomic>

#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/train/distributed.h"

namespace flexfed {
namespace {

constexpr int64_t kF32 = 4;

}  // namespace

int64_t MemoryPlan::total() const {
  int64_t sum = 0;
  for (const MemoryPlanPart& p : parts) sum += p.bytes;
  return sum;
}

const MemoryPlanPart* MemoryPlan::Find(const std::string& name) const {
  for (const MemoryPlanPart& p : parts) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

std::string FormatMemory(int64_t bytes) {
  const double mib = static_cast<double>(bytes) / 1048576.0;
  return mib >= 1024.0 ? absl::StrFormat("%.1f GiB", mib / 1024.0) : absl::StrFormat("%.1f MiB", mib);
}

std::string MemoryPlan::Table() const {
  std::string out;
  for (const MemoryPlanPart& p : parts) out += absl::StrFormat("  %-22s %9.2f GiB  %s\n", p.name, p.bytes / 1073741824.0, p.detail);
  out += absl::StrFormat("  %-22s %9.2f GiB\n", "total", total() / 1073741824.0);
  return out;
}

nlohmann::json MemoryPlan::ToJson() const {
  nlohmann::json parts_json = nlohmann::json::array();
  for (const MemoryPlanPart& p : parts) parts_json.push_back({{"name", p.name}, {"bytes", p.bytes}, {"detail", p.detail}});
  return {{"parts", parts_json}, {"total_bytes", total()}};
}

// Without checkpointing: {every layer's activations, 0}. With: {what each layer's input and routing
// keep for all layers, one (not the first) layer's activations recomputed in the backward}.
static std::pair<int64_t, int64_t> ActivationParts(const ModelConfig& c, const MemoryPlanSettings& s) {
  // What autograd keeps for the backward, per token (common/model/model.cpp, layers.cpp, moe.cpp).
  // An op saves an input only when another input needs a gradient: a frozen matrix's product keeps
  // nothing of its input, so the anchor's attention keeps only what the gradient flowing *through*
  // it needs — and nothing at all in layer 0, which no gradient reaches (its input is the frozen
  // embedding's). Products' outputs are in the compute dtype (a); RMSNorm keeps an fp32 copy of its
  // input; the residual stream, the router and the experts' weighting are fp32.
  const int64_t a = s.bf16_autocast ? 2 : kF32;
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  const int64_t f = c.intermediate_size, layers = c.num_hidden_layers;
  const bool pretrain = s.mode == "pretrain", expert = s.mode == "expert", router = s.mode == "router";
  const int64_t k = s.top_k > 0 ? s.top_k : s.experts;  // experts per token
  int64_t attention = (q + kv) * kF32            // QK-norms' inputs
                      + (q + 2 * kv + q) * a        // attention's q, k, v and output
                      + c.num_attention_heads * kF32  // its log-sum-exp
                      + h * kF32;                   // the post-attention norm's input
  if (pretrain) attention += h * kF32 + q * a;     // trained q, k, v, o keep their inputs
  int64_t ffn = h * kF32;                           // the post-feedforward norm's input
  // A trained FFN's input, cast for autocast by its gate and by its up product (each op casts an
  // activation anew; only weights are cast once per step).
  const int64_t cast = s.bf16_autocast ? 2 * h * a : 0;
  const int64_t silu = s.fused_silu ? 0 : f * a;   // silu(gate), unless fused with its product
  int64_t frozen_expert_ffn = 0;
  const int64_t experts = expert ? 2 : s.experts;
  if ((expert || router) && s.dispatch_moe) {
    // The dispatch path (common/model/moe_dispatch.cpp) keeps, for each token and each of its k
    // experts, the gathered row, the expert's gate and up products and its output, in the compute
    // dtype — silu and the down product's input are recomputed in the backward — whether the expert
    // is trained or not, in every layer; and the routing: logits (fp32), weights (fp32), chosen
    // experts (int32, and int64 for the step's routing counts), the rows' order both ways (int32).
    // When every token takes every expert (k = E: the owner's top-2 of 2, router tuning over all)
    // nothing is gathered: the experts read the token's row itself, kept once.
    const int64_t rows = k == experts ? h * a : k * h * a;
    ffn += h * kF32                               // the router's input (the residual)
           + rows + k * h * a + k * 2 * f * a     // rows, outputs; gate and up
           + experts * kF32 + k * (4 * kF32 + 8);  // the routing
    // Router tuning trains no expert: in layer 0, which no gradient reaches, the experts keep nothing.
    if (router) frozen_expert_ffn = rows + k * 2 * f * a;
  } else if (router) {
    // Router tuning: every expert frozen; the gradient reaches the routers of earlier layers through
    // each chosen expert's FFN (gate, up, silu kept) and the weighting keeps each expert's output (fp32).
    frozen_expert_ffn = k * (2 * f * a + silu);
    ffn += h * kF32 + frozen_expert_ffn + k * h * kF32;
    // With fewer experts per token than experts, each runs on its own tokens (moe.cpp): its weighted
    // output is kept once more by the scatter back into the tokens' rows, with the rows' indices.
    if (k < experts) ffn += k * (h * kF32 + 2 * 8);
  } else if (expert) {
    frozen_expert_ffn = 2 * f * a + silu;            // the public expert: gate, up (, silu(gate))
    ffn += h * kF32                                  // the router's input (the residual)
           + frozen_expert_ffn + 3 * f * a + silu + cast  // the owner's expert also keeps the product for its down matrix
           + 2 * h * kF32;                           // each expert's output, weighted in fp32
  } else {
    ffn += 3 * f * a + silu + (s.bf16_autocast ? cast : h * kF32);  // the trained dense FFN and its input
  }
  if (s.activation_checkpointing) {
    // The layer's input (fp32 residual); a MoE layer's router logits (fp32, kept by the z-loss) and
    // chosen experts (int64).
    const int64_t routing = c.is_moe() || expert || router ? experts * kF32 + k * 8 : 0;
    return {layers * (h * kF32 + routing), attention + ffn};
  }
  int64_t total = layers * (attention + ffn);
  if (!pretrain) total -= attention + frozen_expert_ffn;  // layer 0: no gradient reaches them (the dispatch
                                                          // path keeps a trained expert's all the same)
  return {total, 0};
}

int64_t ActivationBytesPerToken(const ModelConfig& c, const MemoryPlanSettings& s) {
  const auto [kept, recomputed] = ActivationParts(c, s);
  return kept + recomputed;
}

int64_t KeptActivationBytesPerToken(const ModelConfig& c, const MemoryPlanSettings& s) {
  return ActivationParts(c, s).first;
}

MemoryPlan PlanTrainingMemory(const ModelConfig& c, const MemoryPlanSettings& s) {
  const int64_t h = c.hidden_size, f = c.intermediate_size, v = c.vocab_size, layers = c.num_hidden_layers;
  const int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  const int64_t attention = h * q + 2 * h * kv + q * h + q + kv + 2 * h;  // q, k, v, o, QK-norms, the two norms
  const int64_t ffn = 3 * h * f;
  const int64_t embeddings = v * h * (c.tie_word_embeddings ? 1 : 2) + h;
  int64_t frozen = 0, trained = 0, frozen_bytes = 0;
  std::vector<int64_t> trained_tensors;  // element counts, for ZeRO-1's shards
  const int64_t matrix = s.bf16_frozen ? 2 : kF32;  // a frozen matrix's bytes per element
  if (s.mode == "pretrain") {
    trained = embeddings + layers * (attention + ffn);
    trained_tensors.push_back(v * h);
    if (!c.tie_word_embeddings) trained_tensors.push_back(v * h);
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t n : {h * q, h * kv, h * kv, q * h, h * f, h * f, h * f}) trained_tensors.push_back(n);
    }
  } else if (s.mode == "router") {
    // The merged model in fp32, every expert's FFN frozen; each layer's router rows [E, H] and
    // biases [E] trained (the public expert's too).
    frozen = embeddings + layers * (attention + s.experts * ffn);
    frozen_bytes = frozen * kF32;
    trained = layers * s.experts * (h + 1);
    for (int64_t l = 0; l < layers; ++l) {
      trained_tensors.push_back(s.experts * h);
      trained_tensors.push_back(s.experts);
    }
  } else {
    frozen = embeddings + layers * attention + (s.mode == "expert" ? layers * (ffn + h) : 0);  // + r_pub rows
    const int64_t table = s.bf16_embeddings ? 2 : kF32;
    const int64_t vectors = layers * (q + kv + 2 * h) + h + (s.mode == "expert" ? layers * h : 0);  // norms, r_pub
    frozen_bytes = v * h * table + (c.tie_word_embeddings ? 0 : v * h * matrix) + vectors * kF32 +
                   layers * (h * q + 2 * h * kv + q * h + (s.mode == "expert" ? ffn : 0)) * matrix;
    trained = layers * ffn + (s.mode == "expert" ? layers * (h + 1) : 0);
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t n : {h * f, h * f, h * f}) trained_tensors.push_back(n);
      if (s.mode == "expert") {
        trained_tensors.push_back(h);
        trained_tensors.push_back(1);
      }
    }
  }
  // This rank's share of the moments: the largest shard.
  const std::vector<int> owner = ShardOptimizerState(trained_tensors, std::max(1, s.world_size));
  std::vector<int64_t> load(static_cast<size_t>(std::max(1, s.world_size)), 0);
  for (size_t i = 0; i < owner.size(); ++i) load[static_cast<size_t>(owner[i])] += trained_tensors[i];
  const int64_t moments = *std::max_element(load.begin(), load.end());

  const int64_t tokens = s.micro_batch * s.seq_len;
  const int64_t a = s.bf16_autocast ? 2 : kF32;
  const int64_t chunk = std::min(tokens, s.loss_chunk > 0 ? s.loss_chunk : std::max<int64_t>(64, (int64_t{128} << 20) / kF32 / std::max<int64_t>(1, v)));

  MemoryPlan p;
  p.parts.push_back({"frozen weights", frozen_bytes,
                     absl::StrFormat("%.3g B parameters, %s (anchor: embeddings, attention, norms%s)", frozen / 1e9,
                                     !s.bf16_frozen          ? "fp32"
                                     : s.bf16_embeddings     ? "bf16 matrices and embeddings, fp32 norms"
                                                             : "bf16 matrices, fp32 embeddings and norms",
                                     s.mode == "expert"   ? ", the public FFN"
                                     : s.mode == "router" ? absl::StrCat(", the ", s.experts, " experts' FFNs")
                                                          : std::string())});
  p.parts.push_back({"trained weights", trained * kF32, absl::StrFormat("%.3g B parameters, fp32 masters", trained / 1e9)});
  p.parts.push_back({"gradients", trained * kF32, "fp32, of the trained tensors only"});
  const char* moment_type = s.bf16_moments ? "bf16" : "fp32";
  p.parts.push_back({"optimizer state", 2 * moments * (s.bf16_moments ? 2 : kF32),
                     s.world_size > 1 ? absl::StrFormat("AdamW moments, %s, this rank's ZeRO-1 shard of %d", moment_type, s.world_size)
                                      : absl::StrFormat("AdamW moments, %s", moment_type)});
  if (s.bf16_autocast) {
    // Casts a product's backward keeps: of the trained matrices, and of frozen matrices held in
    // fp32 (an fp32 anchor's) — a frozen layer's only where a gradient passes through it (not
    // layer 0, whose input is the frozen embedding's), the output head's always.
    int64_t frozen_casts = 0;
    if (s.mode != "pretrain" && !s.bf16_frozen) {
      const int64_t frozen_ffn = s.mode == "expert" ? ffn : s.mode == "router" ? s.experts * ffn : 0;
      const int64_t per_layer = h * q + 2 * h * kv + q * h + frozen_ffn;
      frozen_casts = (s.activation_checkpointing ? 1 : layers - 1) * per_layer * 2 + v * h * 2;
      // The dispatch path keeps its experts' casts in layer 0 too, where an expert there trains.
      if (s.dispatch_moe && s.mode == "expert" && !s.activation_checkpointing) frozen_casts += frozen_ffn * 2;
    }
    // Routers run in fp32: router tuning casts nothing it trains.
    const int64_t trained_casts = s.mode == "router" ? 0 : s.activation_checkpointing ? (trained / layers) * 2 : trained * 2;
    p.parts.push_back({"autocast copies", trained_casts + frozen_casts,
                       absl::StrCat("bf16 casts of ", s.activation_checkpointing ? "one layer's" : "the",
                                    trained_casts > 0 ? " trained matrices" : "",
                                    trained_casts > 0 && frozen_casts > 0 ? " and" : "",
                                    frozen_casts > 0 ? " fp32 frozen matrices" : "",
                                    s.activation_checkpointing ? " at a time" : ", kept for the step")});
  }
  p.parts.push_back({"activations", tokens * ActivationBytesPerToken(c, s),
                     s.activation_checkpointing
                         ? absl::StrFormat("checkpointed: %d tokens, each of %d layers' input kept, one layer recomputed "
                                           "at a time, %s products", tokens, layers, s.bf16_autocast ? "bf16" : "fp32")
                         : absl::StrFormat("kept for the backward: %d tokens × %d layers, %s products", tokens, layers,
                                           s.bf16_autocast ? "bf16" : "fp32")});
  // The final norm's input and the loss's hidden state and log-sum-exp are kept; one chunk of logits
  // and its gradient exist at a time.
  p.parts.push_back({"loss", tokens * (h * (a + kF32) + kF32 + 8) + chunk * v * (2 * kF32 + a),
                     absl::StrFormat("final norm and output head %d tokens at a time (never [tokens, vocabulary])", chunk)});
  return p;
}

struct TensorMemoryMeter::Listener : c10::MemoryReportingInfoBase {
  std::atomic<int64_t> now{0}, peak{0};
  void reportMemoryUsage(void*, int64_t bytes, size_t, size_t, c10::Device device) override {
    if (!device.is_cpu()) return;
    const int64_t held = now.fetch_add(bytes) + bytes;
    int64_t seen = peak.load();
    while (held > seen && !peak.compare_exchange_weak(seen, held)) {
    }
  }
  bool memoryProfilingEnabled() const override { return true; }
};

struct TensorMemoryMeter::Installed {
  explicit Installed(std::shared_ptr<Listener> listener) : guard(c10::DebugInfoKind::PROFILER_STATE, std::move(listener)) {}
  c10::DebugInfoGuard guard;  // pops the listener when the meter ends (same thread, nested like any guard)
};

TensorMemoryMeter::TensorMemoryMeter() : listener_(std::make_shared<Listener>()) {
  installed_ = std::make_unique<Installed>(listener_);
}

TensorMemoryMeter::~TensorMemoryMeter() = default;

int64_t TensorMemoryMeter::peak_bytes() const { return listener_->peak.load(); }

int64_t TensorMemoryMeter::net_bytes() const { return listener_->now.load(); }

}  // namespace flexfed
