// The FlexOlmo mixture-of-experts block (docs/METHOD.md §2, "MoE block"), CPU/LibTorch path.
// Dimensions: N=tokens, H=hidden, F=FFN width, E=experts, K=experts per token.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace flexfed {

struct ExpertWeights {
  at::Tensor gate_proj;  // [F, H]
  at::Tensor up_proj;    // [F, H]
  at::Tensor down_proj;  // [H, F]
};

// One expert FFN's activations in a forward, kept in the autograd graph, for per-sequence gradient
// norms (differential privacy, common/train/dp_sgd.h): the FFN computes a = x·gateᵀ, b = x·upᵀ,
// h = silu(a)·b, y = h·downᵀ on the rows it was routed.
struct FfnActivations {
  at::Tensor rows;     // [n] int64: which of the N tokens, ascending
  at::Tensor x, a, b;  // [n, H], [n, F], [n, F]
  at::Tensor h, y;     // [n, F], [n, H]
};

// SwiGLU with its activations recorded in `record` (same values as SwiGlu).
at::Tensor SwiGluRecorded(const at::Tensor& x, const ExpertWeights& w, FfnActivations* record);

struct RouterOutput {
  at::Tensor logits;   // [N, E] fp32, after bias and opt-out mask
  at::Tensor weights;  // [N, K] fp32: softmax over allowed experts, top-k, renormalised if asked
  at::Tensor indices;  // [N, K] int64
};

// x32 · router32ᵀ: [N, H] × [E, H] → [N, E] fp32, with autocast off (the router always runs in fp32).
at::Tensor RouterLogits(const at::Tensor& x, const at::Tensor& router);

// logits = x32 · router32ᵀ (+ min(bias_e, 0) for e ≥ 1) (+ mask); p = softmax(logits);
// (weights, indices) = topk(p, k); weights /= Σ weights only when `norm_topk_prob`.
// x: [N, H]; router: [E, H]; bias: [E] or undefined; mask: [E] fp32 (0 allowed, -inf excluded) or
// undefined. Differentiable in router and bias.
RouterOutput Route(const at::Tensor& x, const at::Tensor& router, const at::Tensor& bias, const at::Tensor& mask,
                   int64_t top_k, bool norm_topk_prob);

// Σ_k weights[:, k] · expert_{indices[:, k]}(x), each expert run only on the tokens routed to it,
// experts summed in ascending order (as HF does). x: [N, H] → [N, H] in x's dtype. With `record`,
// expert `recorded_expert`'s activations go there (rows undefined when no token chose it).
at::Tensor CombineExperts(const at::Tensor& x, const std::vector<ExpertWeights>& experts, const RouterOutput& route,
                          int64_t recorded_expert = -1, FfnActivations* record = nullptr);

}  // namespace flexfed
