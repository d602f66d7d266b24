// The building blocks of the FlexOlmo forward (docs/METHOD.md §2), as free functions so tests can
// check each against the reference and the CUDA path can reuse them.
// Dimensions: B=batch, T=tokens, N=B·T, H=hidden, F=FFN width, D=head dim, P=positions.
#pragma once

#include <ATen/ATen.h>

namespace flexfed {

// RMSNorm computed in fp32; the weight multiplies the fp32 result before the cast back to x's
// dtype (HF FlexOlmoRMSNorm). x: [..., W], weight: [W]. On the CPU it runs fused: with gradients
// off as one pass per row (decoding is dominated by such small ops); in fp32 training as one
// vectorised pass per row each way, keeping x and one scale per row. On a GPU (an fp32 weight, as
// every FlexFed norm's) it runs as RmsNormFp32Fused. RmsNormReference() is the plain ATen
// composition all are tested against, and the path everywhere else (CPU bf16 training).
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor RmsNormReference(const at::Tensor& x, const at::Tensor& weight, double eps);
// The same through ATen's fused RMSNorm on x cast to fp32 (one kernel each way on a GPU, where the
// composition takes about eight forward and fifteen backward; it keeps the fp32 input and one scale
// per row, as the composition does). weight: fp32. Any device; on the CPU ATen composes it.
at::Tensor RmsNormFp32Fused(const at::Tensor& x, const at::Tensor& weight, double eps);

// cat(-x[..., D/2:], x[..., :D/2]).
at::Tensor RotateHalf(const at::Tensor& x);

struct RopeTables {
  at::Tensor cos, sin;  // [P, D] fp32, emb = cat(freqs, freqs)
};
// inv_freq = 1 / theta^(2i/D) in fp32; freqs = position · inv_freq.
RopeTables MakeRopeTables(double theta, int64_t head_dim, int64_t positions);

// x: [B, heads, T, D]; cos, sin: [T, D] fp32. Computed in fp32, cast back to x's dtype.
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// [B, G, S, D] → [B, G·groups, S, D]: each key/value head repeated for its group of query heads.
at::Tensor RepeatKv(const at::Tensor& x, int64_t groups);

// Causal softmax attention: query i (at position past + i) sees keys 0 .. past + i.
// q: [B, heads, T, D]; k, v: [B, heads, past + T, D] → [B, heads, T, D], softmax(q·kᵀ·scale)·v.
// Through ATen's scaled_dot_product_attention, which picks a fused kernel where one applies (flash
// attention on CPU and CUDA, cuDNN or memory-efficient on CUDA): the [T, T] scores are never kept,
// so memory grows with T, not T² (docs/PERFORMANCE.md). Softmax is accumulated in fp32 whatever the
// inputs' dtype.
at::Tensor CausalAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t past, double scale);

// silu(a) · b, elementwise. In training on the CPU (gradients on, fp32) one vectorised pass forward
// and one backward (da and db together), keeping a and b but not silu(a) — where autograd's ATen
// composition takes five passes and keeps three tensors; its exp is a polynomial within 2 ulp of
// the exact one, so values may differ from ATen's in the last bit (tested). Elsewhere (inference,
// other dtypes, CUDA) the ATen ops, as HF computes them.
at::Tensor SiluMul(const at::Tensor& a, const at::Tensor& b);

// down(silu(x·gateᵀ) * (x·upᵀ)). x: [N, H], gate/up: [F, H], down: [H, F] → [N, H].
at::Tensor SwiGlu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down);

}  // namespace flexfed
