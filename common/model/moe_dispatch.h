// The MoE block as dispatch ops (kernels/moe_ops.h) under autograd: router → align → gather →
// each expert's FFN on its contiguous slice (matrix products through LibTorch, cuBLAS on a GPU) →
// combine. On CUDA tensors each op is a CUDA kernel (when FlexFed is built with them); on CPU
// tensors it is the op's CPU reference, so this whole path, backward included, is tested without
// a GPU. The model takes it for CUDA tensors; on the CPU it keeps the LibTorch path of moe.h, which
// matches Hugging Face bit for bit.
// Dimensions: N=tokens, H=hidden, F=FFN width, E=experts, K=experts per token.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/model/moe.h"

namespace flexfed {

// True when this build has the CUDA kernels and a CUDA LibTorch (FLEXFED_CUDA, CMakeLists.txt).
bool CudaKernelsBuilt();

// Whether the model runs a MoE block on `device` through DispatchMoe: CUDA tensors in a build with
// the kernels. The environment's FLEXFED_MOE=libtorch turns it off (for comparisons);
// FLEXFED_MOE=dispatch also takes it on the CPU, through the ops' references (slow: for tests that
// check what the GPU path keeps, such as the memory plan's).
bool UseDispatchMoe(const at::Device& device);

struct DispatchMoeOutput {
  at::Tensor out;      // [N, H] in x's dtype
  at::Tensor logits;   // [N, E] fp32, after bias and mask (differentiable: the z-loss reads them)
  at::Tensor indices;  // [N, K] int64
};

// Same contract as Route + CombineExperts (moe.h): x: [N, H] fp32 or bf16; router: [E, H];
// bias: [E] or undefined; mask: [E] fp32 (0 allowed, -inf excluded) or undefined. The experts'
// products run in autocast's dtype when autocast is on for x's device, else in x's dtype; the
// router always in fp32. Differentiable in x, router, bias and every expert weight.
DispatchMoeOutput DispatchMoe(const at::Tensor& x, const at::Tensor& router, const at::Tensor& bias,
                              const at::Tensor& mask, int64_t top_k, bool norm_topk_prob,
                              const std::vector<ExpertWeights>& experts);

}  // namespace flexfed
