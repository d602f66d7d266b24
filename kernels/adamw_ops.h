// AdamW's update of one parameter over raw buffers (common/train/adamw.h uses it): fp32 master
// weights and gradients, the two moments in fp32 or bf16 (`--optimizer-moments bf16`), each element
// read and written once, the arithmetic in fp32. ATen's fused AdamW wants the moments in the
// weights' dtype, so with bf16 moments its composition took about twelve passes over the memory.
// AdamWReference is the CPU's pass (vectorised) and the semantics the CUDA kernel
// (kernels/adamw.cuh) is tested against. Torch-free and CUDA-free.
#pragma once

#include <cstdint>

#include "kernels/moe_ops.h"  // DType and the bf16 conversions

namespace flexfed::kernels {

// Per element, in fp32, as torch.optim.AdamW (decoupled weight decay):
//   p ← p · decay                       (decay = 1 − lr · weight_decay; skipped when it is 1)
//   m ← m · β1 + g · c1                 (c1 = 1 − β1)
//   v ← v · β2 + g² · c2                (c2 = 1 − β2)
//   p ← p − step_size · m / (√v / bias2_sqrt + ε)   (step_size = lr / (1 − β1ᵗ), bias2_sqrt = √(1 − β2ᵗ))
// bf16 moments are widened for it and rounded back to nearest even.
struct AdamWArgs {
  float* param = nullptr;       // [count] fp32
  const float* grad = nullptr;  // [count] fp32
  void* exp_avg = nullptr;      // [count] m, in `moments`
  void* exp_avg_sq = nullptr;   // [count] v, in `moments`
  int64_t count = 0;
  DType moments = DType::kF32;
  float beta1 = 0.9f, beta2 = 0.999f, c1 = 0.1f, c2 = 0.001f, eps = 1e-8f;
  float decay = 1.0f, step_size = 0.0f, bias2_sqrt = 1.0f;
};

// The host's derived scalars for step t ≥ 1 (computed in double, as ATen's composition does).
AdamWArgs AdamWStepScalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step);

void AdamWReference(const AdamWArgs& a);

}  // namespace flexfed::kernels
