// What an owner's training run will hold in memory, before anything is allocated:
// `flexfed-owner train --memory-report` prints it, and a run whose plan does not fit the device is
// refused with the numbers (docs/OWNER_GUIDE.md "Memory"). Torch-free arithmetic on the model's
// shape and the run's settings, following what common/train/training.cpp allocates.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/core/model_config.h"
#include <nlohmann/json.hpp>

namespace flexfed {

struct MemoryPlanSettings {
  std::string mode = "expert";  // expert | dense | pretrain | router (router tuning of a merged model)
  int64_t micro_batch = 8;      // sequences per forward (--batch-size)
  int64_t seq_len = 256;
  bool bf16_autocast = false;   // products and their saved outputs in bf16; norms, router, loss in fp32
  int world_size = 1;           // data-parallel ranks: ZeRO-1 shards the AdamW moments
  int64_t loss_chunk = 0;       // rows per chunk of the loss (0: DefaultLossChunk of the vocabulary)
  bool bf16_frozen = false;     // frozen matrices kept in bf16 (owner modes under bf16 autocast)
  bool bf16_embeddings = false;  // ... the embedding table too (its values are bf16: a bf16 checkpoint)
  bool bf16_moments = false;    // AdamW's moments in bf16
  bool activation_checkpointing = false;  // each layer's input kept; one layer recomputed at a time
  bool fused_silu = false;      // silu(gate)·up fused, silu(gate) not kept (the CPU's fp32 training: SiluMul)
  bool dispatch_moe = false;    // the expert's MoE block through the dispatch ops (a GPU's: moe_dispatch.h)
  int64_t top_k = 2;            // experts per token (0: all; the dispatch path keeps one row per token and expert)
  int64_t experts = 2;          // router mode: the merged model's experts (the public one and the modules)
};

struct MemoryPlanPart {
  std::string name;
  int64_t bytes = 0;
  std::string detail;  // what it is, and its dtype
};

struct MemoryPlan {
  std::vector<MemoryPlanPart> parts;
  int64_t total() const;
  const MemoryPlanPart* Find(const std::string& name) const;  // the part of that name, or null
  std::string Table() const;  // one line per part and the total, in GiB
  nlohmann::json ToJson() const;
};

// "12.3 GiB", or "45.6 MiB" below a GiB: sizes in one-line messages.
std::string FormatMemory(int64_t bytes);

// The plan of one rank: frozen weights (fp32, or bf16 matrices), the trained tensors' fp32
// masters and gradients, AdamW's two moments (this rank's largest ZeRO-1 shard), autocast's bf16
// copies of the trained matrices (one layer's with checkpointing), the activations the backward
// keeps for a micro-batch (each layer's input and one layer's with checkpointing), and the loss's
// working block. `anchor` is the anchor's config (for pretraining, the new model's).
MemoryPlan PlanTrainingMemory(const ModelConfig& anchor, const MemoryPlanSettings& settings);

// Activations the backward keeps per token, all layers, in bytes (the plan's largest variable part).
// With checkpointing: each layer's input (and routing) plus one layer's recomputed activations.
int64_t ActivationBytesPerToken(const ModelConfig& anchor, const MemoryPlanSettings& settings);
// With checkpointing, the part a forward leaves alive until the backward (each layer's input and
// routing): ActivationBytesPerToken less one layer's recomputation. Without, all of it.
int64_t KeptActivationBytesPerToken(const ModelConfig& anchor, const MemoryPlanSettings& settings);

// The tensor memory the CPU allocator hands out on this thread while it lives — what a plan
// predicts, without the heap's or the system's view of it (fragmentation, pages kept, libraries'
// own buffers): its peak and its net change since construction, counting only tensors allocated
// since then (a tensor freed that predates it counts nothing). It listens where LibTorch's memory
// profiler does, so it cannot run beside that profiler. Benchmarks and tests measure a step with it.
class TensorMemoryMeter {
 public:
  TensorMemoryMeter();
  ~TensorMemoryMeter();
  TensorMemoryMeter(const TensorMemoryMeter&) = delete;
  TensorMemoryMeter& operator=(const TensorMemoryMeter&) = delete;

  int64_t peak_bytes() const;  // the most held at once, above what was held at construction
  int64_t net_bytes() const;   // held now, above what was held at construction

 private:
  struct Listener;
  std::shared_ptr<Listener> listener_;
  struct Installed;
  std::unique_ptr<Installed> installed_;
};

}  // namespace flexfed
