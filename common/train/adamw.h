// AdamW (decoupled weight decay, bias-corrected moments), as torch.optim.AdamW computes it, with
// its state as plain named tensors so checkpoints stay in safetensors (nothing pickled).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/model/checkpoint.h"

namespace flexfed {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;
  // The dtype the two moments are kept in: fp32, or bf16 for half the memory (each step then
  // updates them in fp32 and rounds them back; the update itself is the fp32 one).
  at::ScalarType moment_dtype = at::kFloat;
};

// Owns the first and second moments of each parameter. Parameters are leaves with
// requires_grad; the optimizer updates them in place under no-grad. Not thread-safe.
class AdamW {
 public:
  // With `owned` (one flag per parameter; ZeRO-1 sharding, common/train/distributed.h), moments
  // are kept and updates made only for the parameters marked true — the others are another
  // rank's. Empty: every parameter is owned.
  AdamW(std::vector<NamedTensor> params, AdamWOptions options, std::vector<bool> owned = {});

  // One update with learning rate `lr` from the parameters' current .grad(); parameters without a
  // gradient are skipped (their moments stay as they are).
  void Step(double lr);
  void ZeroGrad();  // drops the gradients (undefined, not zeros: no memory held between steps)

  int64_t steps() const { return step_; }
  const std::vector<NamedTensor>& params() const { return params_; }
  bool owns(size_t i) const { return owned_[i]; }
  at::ScalarType moment_dtype() const { return options_.moment_dtype; }
  // Parameter i's moments (owned parameters only; undefined otherwise).
  const at::Tensor& exp_avg(size_t i) const { return exp_avg_[i]; }
  const at::Tensor& exp_avg_sq(size_t i) const { return exp_avg_sq_[i]; }

  // State as tensors "<param>.exp_avg", "<param>.exp_avg_sq" (of the owned parameters) plus
  // "step" (I64 scalar).
  std::vector<NamedTensor> State() const;
  // Restores the owned parameters' moments and the step from a state (every owned parameter's
  // tensors present with its shape; others in it are ignored).
  absl::Status LoadState(const std::vector<NamedTensor>& state);

 private:
  std::vector<NamedTensor> params_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;  // undefined for parameters not owned
  std::vector<bool> owned_;
  // The update of one fp32 parameter whose moments are not fp32 (ATen's fused AdamW wants them in
  // the weights' dtype): one pass (kernels/adamw_ops.h: the CUDA kernel on a GPU, the vectorised
  // loop on the CPU). False, with nothing changed, where it does not apply.
  bool StepInOnePass(at::Tensor& p, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, double lr);

  AdamWOptions options_;
  int64_t step_ = 0;
};

// The update of one parameter (ATen's vectorised elementwise ops; a hand-written single-pass CPU
// loop measured 3x slower without SIMD):
// p ← p·(1 − lr·wd); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
// p ← p − lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps).
void AdamWUpdate(at::Tensor& p32, const at::Tensor& g, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, double lr,
                 const AdamWOptions& options, int64_t step);

// The global L2 norm of the gradients of `params` (fp32), and, when max_norm > 0 and the norm
// exceeds it, the gradients scaled by max_norm / (norm + 1e-6) as torch.nn.utils.clip_grad_norm_.
double ClipGradNorm(const std::vector<NamedTensor>& params, double max_norm);

}  // namespace flexfed
