// The training loop: one loop for an owner's expert (docs/METHOD.md §3), the dense "no coordination"
// ablation, and full pretraining (how the demo's anchor is made). A run lives in a folder:
//   RUN/train_config.json        the settings, echoed (and checked on --resume)
//   RUN/metrics.jsonl            one JSON object per logged step and per validation
//   RUN/checkpoints/step-N/      trainable.safetensors, optimizer.safetensors, state.json
//   RUN/checkpoints/latest       name of the newest complete checkpoint
//   RUN/model/                   the trained model as an HF checkpoint (written at the end)
// Format details: docs/OWNER_GUIDE.md.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/train/adamw.h"
#include "common/train/data.h"
#include "common/train/distributed.h"
#include "common/train/loss.h"
#include "common/train/memory_plan.h"
#include "common/model/model.h"
#include "common/core/progress.h"
#include "common/model/tokenizer.h"
#include <nlohmann/json.hpp>

namespace flexfed {

// Router mode writes the tuned routers here, in the run folder (common/merge/router_tuning.h).
inline constexpr char kRouterTuningFile[] = "router_tuning.safetensors";

struct TrainConfig {
  std::string mode = "expert";  // expert | dense | pretrain | router (router tuning of a merge, docs/METHOD.md §4)
  std::vector<std::string> data;
  std::string text_field = "text";
  double validation_fraction = 0.05;
  int64_t seq_len = 256;
  int64_t batch_size = 8;  // sequences per micro-batch
  int64_t grad_accum = 1;  // micro-batches per optimizer step
  int64_t max_steps = 0;   // optimizer steps; 0 = derive from token_budget
  int64_t token_budget = 0;
  double lr = 9e-4;
  double min_lr_ratio = 0.0;  // cosine decays to lr · min_lr_ratio
  int64_t warmup_steps = 100;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  double grad_clip = 1.0;
  double z_loss = 1e-3;     // router z-loss coefficient (0 = off)
  bool router_bias = true;  // learnable negative bias for the owner's expert
  int64_t top_k = 2;        // experts per token while training (of 2; router mode: of E, 0 = all)
  int64_t val_every = 100;
  int64_t val_batches = 8;
  int64_t checkpoint_every = 100;
  int64_t keep_checkpoints = 2;
  int64_t log_every = 10;
  uint64_t seed = 0;
  std::string device = "auto";     // auto | cpu | cuda (auto: the first GPU when there is one)
  std::string precision = "auto";  // auto | fp32 | bf16 (bf16 autocast; auto: bf16 on a GPU, fp32 on the CPU)
  int threads = 0;              // 0 = all cores
  // Memory (docs/OWNER_GUIDE.md "Memory"). Under bf16 autocast the frozen matrices of a bf16 anchor
  // are kept in bf16 (the products read them in bf16 anyway: the same numbers, half the memory).
  bool activation_checkpointing = false;  // keep each layer's input only; recompute the layer in the backward
  std::string optimizer_moments = "fp32";  // fp32 | bf16: the dtype AdamW keeps its two moments in
  std::string preset = "tiny";  // pretrain: the model size (docs/ARCHITECTURE.md §8)
  std::string tokenizer;        // pretrain: a folder with tokenizer.json (and tokenizer_config.json); "" = bytes
  // Differential privacy (DP-SGD, docs/PRIVACY.md; expert and dense modes): each step trains on a
  // Poisson sample of the training sequences (each with probability q = batch_size·grad_accum / N),
  // clips every sequence's gradient to dp_max_grad_norm, adds N(0, σ²C²) noise to the sum and divides
  // by the expected batch; --grad-clip does not apply.
  double dp_max_grad_norm = 0;      // C; > 0 turns DP-SGD on
  double dp_noise_multiplier = -1;  // σ ≥ 0, or -1: the smallest σ meeting dp_epsilon
  double dp_epsilon = 0;            // the target ε for the whole run, when σ is not given
  double dp_delta = 1e-5;           // δ of the reported (ε, δ)

  absl::Status Validate() const;
  nlohmann::json ToJson() const;
  static absl::StatusOr<TrainConfig> FromJson(const nlohmann::json& j, const std::string& source);
  // The fields that decide the result (not threads, device, logging or checkpoint cadence): a run
  // can only be resumed with the same ones.
  nlohmann::json IdentityJson() const;
  int64_t TokensPerStep() const { return batch_size * seq_len * grad_accum; }
  bool dp() const { return dp_max_grad_norm > 0; }
};

// What a DP-SGD run spends: its sampling, noise, clipping and the (ε, δ) after `steps` steps.
struct DpAccount {
  double noise_multiplier = 0, max_grad_norm = 0, sampling_rate = 0, delta = 0, epsilon = 0;
  int64_t steps = 0, expected_batch = 0, sequence_tokens = 0;
  nlohmann::json ToJson() const;
};

struct TrainInputs {
  std::string anchor_dir;   // expert and dense modes
  std::string router_init;  // expert mode: r_i (flexfed-owner router-init); dense mode: optional
  std::string run_dir;
  std::string cache_dir;    // token cache
  std::vector<std::string> modules;  // router mode: the owners' expert modules, in router order
};

struct TrainOutcome {
  int64_t steps = 0;
  int64_t tokens = 0;
  bool interrupted = false;
  double last_loss = 0;
  double last_val_loss = 0;
};

class Trainer {
 public:
  // Sets up a new run in inputs.run_dir (which must hold no run), or with `resume` continues the
  // run there from its latest checkpoint: weights, optimizer, schedule and data position.
  // With `group` (data-parallel training, common/train/distributed.h; it must outlive the
  // Trainer) this process is one rank: it trains on its share of every step, sums gradients with
  // the others and keeps its shard of the optimizer state; only rank 0 writes the run folder.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const TrainConfig& config, const TrainInputs& inputs,
                                                         bool resume, DataParallelGroup* group = nullptr);

  // Trains until the step budget is spent or `stop` becomes true (checked after every step, e.g.
  // set by SIGINT; data-parallel ranks stop together when any of them is asked to). Checkpoints every checkpoint_every steps and when it stops; at the end also
  // writes RUN/model. `progress` may be null.
  absl::StatusOr<TrainOutcome> Run(const std::atomic<bool>* stop, ProgressReporter* progress);

  // One optimizer step (grad_accum micro-batches; with DP-SGD, the step's Poisson sample); returns
  // the mean training loss.
  double Step();
  // One optimizer step on these training sequences (ids into the packed training data), in
  // micro-batches of batch_size: the plain step, or with DP-SGD the clipped, noised one (its noise
  // from the current step). With σ = 0 and a clipping norm no sequence reaches, the DP step gives
  // the plain step's weights bit for bit when the batch is a power of two (tested).
  double StepOn(const std::vector<int64_t>& sequences);
  // The privacy spent so far (DP-SGD runs; empty otherwise).
  std::optional<DpAccount> Privacy() const;
  // Per-sequence losses ℓ [B] fp32 (mean token cross-entropy + z-loss) of one micro-batch of
  // training sequences, as a step computes them (the forward under autocast when on); its tokens
  // and routing count for the metrics.
  at::Tensor SequenceLosses(const std::vector<int64_t>& sequences, ForwardTrace& trace);
  // ‖∇ℓ_s‖² over the trained tensors for each sequence s of one micro-batch, as DP-SGD clips them
  // (from activations and output gradients; expert and dense modes). fp64 [B]. For tests.
  at::Tensor SequenceGradientNormsSq(const std::vector<int64_t>& sequences);
  EvalResult Validate();
  absl::Status SaveCheckpoint();
  absl::Status WriteModel();  // RUN/model; router mode: RUN/router_tuning.safetensors

  int64_t step() const { return step_; }
  // The run's memory plan total (PlanRunMemory), reported beside what the first step reached.
  void set_planned_bytes(int64_t bytes) { planned_bytes_ = bytes; }
  int64_t total_steps() const { return total_steps_; }
  const FlexOlmoModel& model() const { return *model_; }
  const std::vector<NamedTensor>& trainable() const { return trainable_; }
  // Every model tensor that is not trained (for the gradient test).
  std::vector<NamedTensor> FrozenTensors() const;
  double LearningRate(int64_t step) const;
  // MFU's parts: FLOPs per trained token (6 per trained weight, 4 per frozen weight used, causal
  // attention) and the matrix-product rate measured on the training device when the run started.
  double flops_per_token() const { return flops_per_token_; }
  double gemm_rate() const { return gemm_rate_; }
  at::Device device() const { return device_; }
  // "cuda:0, bf16 autocast (fp32 master weights)" or "cpu, fp32": what the run computes on.
  std::string ComputeDescription() const;

 private:
  Trainer() = default;
  absl::Status Resume();
  void Compose();  // installs the trained leaves into the model (router rows are concatenated)
  std::vector<int64_t> NextBatch();  // the next batch_size sequence ids of the shuffled order
  double DpMicroBatch(const std::vector<int64_t>& sequences);  // adds Σ_s c_s ∇ℓ_s; returns Σ ℓ
  ForwardTrace DpTrace() const;  // a trace that records the trained FFN and the router inputs
  // Per-sequence squared gradient norms [B] fp64 from the losses and their trace (graph kept).
  at::Tensor GradientNormsSq(const at::Tensor& losses, const ForwardTrace& trace);
  // [layers, experts] int64 top-1 counts since the last log, on the training device: added to on the
  // device each step, read back once per log (a per-layer read would stall a GPU every layer).
  at::Tensor routing_counts_;
  bool lead() const;  // writes the run folder: the only process, or rank 0
  void FinishDeviceWork() const;  // on a GPU, waits until the device has done everything queued
  void SumGradients();  // data-parallel: every rank's gradients summed (undefined where all are)
  void BroadcastUpdated();  // data-parallel: each tensor from the rank that stepped it
  bool AnyRank(bool flag);  // data-parallel: whether any rank's flag is set (the flag alone otherwise)
  // After the first step of a run (or of its resumption): the memory it reached beside the memory
  // plan (set_planned_bytes), into metrics.jsonl and as a progress line — on a GPU PyTorch's peak allocated and reserved
  // bytes, on the CPU the peak resident size.
  void ReportMemory(std::ostream& metrics, ProgressReporter* progress) const;
  // The routing counts since the last log as fractions per layer (summed over ranks), then cleared;
  // empty when there are none (a dense model, or no step since).
  std::vector<std::vector<double>> TakeRoutingFractions();
  std::vector<NamedTensor> FullOptimizerState();  // data-parallel: gathered from the shards (rank 0's is whole)

  DataParallelGroup* group_ = nullptr;
  // Data-parallel without DP-SGD: the gradients summed while the step's last backward runs
  // (FLEXFED_GRADIENT_OVERLAP=off sums them after it instead, as DP-SGD does: SumGradients).
  std::unique_ptr<OverlappedGradientSum> overlapped_sum_;
  std::vector<int> state_owner_;  // ZeRO-1: the rank keeping each trainable tensor's optimizer state
  // Data-parallel: seconds this rank's steps have spent exchanging gradients, loss totals and
  // updated weights (on a GPU until the device finished them), since the last log.
  double communication_seconds_ = 0;

  TrainConfig config_;
  TrainInputs inputs_;
  std::string anchor_id_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::optional<FlexOlmoModel> model_;
  std::vector<NamedTensor> trainable_;
  std::vector<at::Tensor> router_pub_;   // expert mode: per layer [1, H], frozen
  std::vector<at::Tensor> router_rows_;  // expert mode: per layer [H], trained (views into trainable_)
  std::vector<at::Tensor> router_bias_;  // expert mode: per layer [1], trained
  std::vector<std::string> tuned_experts_;    // router mode: the modules' SHA-256, in router order
  std::vector<std::string> resumed_experts_;  // router mode, resuming: those the run was started with
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<PackedSequences> train_, val_;
  std::vector<int64_t> val_indices_;
  int64_t step_ = 0, tokens_ = 0, total_steps_ = 0;
  int64_t epoch_ = 0, position_ = 0;  // data position: next sequence is order(epoch)[position]
  std::vector<int64_t> order_;
  double last_grad_norm_ = 0;
  at::Device device_ = at::kCPU;
  std::optional<at::ScalarType> autocast_;  // bf16 when the forward runs under autocast
  double gemm_rate_ = 0;  // FLOP/s measured at start, for MFU
  int64_t planned_bytes_ = -1;  // the memory plan's total, when the caller planned the run
  double flops_per_token_ = 0;
  double dp_sigma_ = 0, dp_q_ = 0;  // DP-SGD: noise multiplier and sampling rate
};

// The memory plan of a run of `config` on `inputs` (common/train/memory_plan.h), one rank of
// `world_size`, before anything is loaded: the anchor's config.json is read (for pretraining, the
// preset's shape with the tokenizer's vocabulary).
absl::StatusOr<MemoryPlan> PlanRunMemory(const TrainConfig& config, const TrainInputs& inputs, int world_size);
// Changes of settings that make a run's plan fit `capacity` bytes while training on the same
// sequences per step (and validating on the same ones): a micro-batch that divides --batch-size with
// more accumulation, activation checkpointing (one more forward per step), bf16 AdamW moments. Each
// combination with its largest micro-batch that fits, fewest changes first, leaving out one that a
// subset of its changes matches with an equal or larger micro-batch. Empty when the run fits as it is
// or when nothing fits; `smallest` is then the least any combination needs (set only then).
struct MemoryFit {
  std::string args;         // the flags that change, e.g. "--batch-size 2 --grad-accum 8 --activation-checkpointing"
  TrainConfig config;       // the run's settings with them
  int64_t total_bytes = 0;  // the plan with them
};
struct MemoryFits {
  std::vector<MemoryFit> fits;
  MemoryFit smallest;
};
absl::StatusOr<MemoryFits> FittingSettings(const TrainConfig& config, const TrainInputs& inputs, int world_size,
                                           int64_t capacity);
// What one of `processes` processes on this machine, training on the device `config.device`
// chooses, may hold: the free memory of its GPU (cuda:local_rank), or the machine's available
// memory (MemAvailable) shared among them. With the device's name.
absl::StatusOr<std::pair<int64_t, std::string>> TrainingMemoryCapacity(const TrainConfig& config, int processes,
                                                                       int local_rank = 0);

// Holds PyTorch's CUDA allocator on cuda:local_rank to `bytes` (an allocation beyond fails as out of
// memory) when `config` trains on a GPU; nothing on the CPU, where the limit only plans.
absl::Status LimitDeviceMemory(const TrainConfig& config, int local_rank, int64_t bytes);

// The newest complete checkpoint folder of a run, or NotFound.
absl::StatusOr<std::string> LatestCheckpoint(const std::string& run_dir);

}  // namespace flexfed
