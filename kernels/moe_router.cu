// Router: softmax + negative bias + opt-out mask + top-k, one pass per token (docs/METHOD.md §2).
//
// Algorithm (forward):
//   1. A token is handled by a group of G lanes of one warp, G = the smallest power of two ≥ E,
//      at most 32; lane l holds experts l, l + G, l + 2G, … (kPer = ⌈E / G⌉ ≤ 8 of them), so the
//      group's loads of one logits row are contiguous. A 256-thread block handles 256 / G tokens.
//   2. Each lane forms its logits: + min(bias_e, 0) for e ≥ 1, -inf where the expert is excluded,
//      and writes them back (the training loss's z-term and the backward read them).
//   3. Group max and group sum of exp(l - max) by butterfly shuffles give p = exp(l - max) / Σ.
//   4. K rounds of a group arg-max over the experts not yet taken, comparing (p, -e) so equal
//      probabilities go to the lower expert index; lane 0 writes each round's weight and index.
//      The weights' running sum (in round order) renormalises them when asked. NaN probabilities
//      rank below all numbers (the reference does the same), so the indices stay valid.
// Backward (per token, same layout): recompute p from the saved logits; G_e = the slot gradient
// of the expert (normalised form: (dw_j − Σ dw·w) / S); grad_l = p·(G − Σ p·G).
// Limits: E ≤ kMaxExperts (256) for the per-lane register arrays; at least one allowed expert
// (else the softmax is 0/0); tokens·G < 2⁶³.
#include "kernels/moe_router.cuh"

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda_check.cuh"
#include "kernels/device_util.cuh"

namespace flexfed::kernels {
namespace {

constexpr int kBlock = 256;

int GroupWidth(int experts) {
  int g = 1;
  while (g < experts && g < 32) g *= 2;
  return g;
}

void CheckShape(const char* op, int64_t tokens, int experts, int top_k) {
  if (tokens < 0 || experts < 1 || experts > kMaxExperts || top_k < 1 || top_k > experts) {
    throw std::invalid_argument(std::string(op) + ": need 1 ≤ top_k ≤ experts ≤ " + std::to_string(kMaxExperts) +
                                ", got top_k " + std::to_string(top_k) + " of " + std::to_string(experts));
  }
}

// A NaN probability (a diverged run) ranks below every number, so K distinct valid experts are
// always chosen and the NaN reaches the loss instead of an out-of-range index reaching align.
__device__ __forceinline__ float RankKey(float p) { return isnan(p) ? -0.5f : p; }

// Step 3: this lane's probabilities from its logits (experts past E get 0).
template <int kPer>
__device__ __forceinline__ void LaneSoftmax(float (&l)[kPer], float (&p)[kPer], int lane, int width, int experts) {
  float max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPer; ++i) max = fmaxf(max, l[i]);
  max = GroupMax(max, width);
  float sum = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane + i * width;
    p[i] = e < experts ? expf(l[i] - max) : 0.0f;
    sum += p[i];
  }
  sum = GroupSum(sum, width);
#pragma unroll
  for (int i = 0; i < kPer; ++i) p[i] /= sum;
}

template <int kPer>
__global__ void RouterForwardKernel(RouterArgs a, int width) {
  const int lane = threadIdx.x % width;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / width;
  const bool valid = n < a.tokens;  // idle groups still take part in the shuffles
  const int experts = a.experts;

  float l[kPer], p[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane + i * width;
    float v = -INFINITY;
    if (valid && e < experts) {
      v = a.logits_in[n * experts + e];
      if (a.bias != nullptr && e >= 1) v += fminf(a.bias[e], 0.0f);
      if (a.allowed != nullptr && a.allowed[e] == 0) v = -INFINITY;
      a.logits_out[n * experts + e] = v;
    }
    l[i] = v;
  }
  if (!valid) l[0] = 0.0f;  // keep idle groups' arithmetic finite
  LaneSoftmax<kPer>(l, p, lane, width, experts);

  unsigned taken = 0;
  float total = 0;
  for (int j = 0; j < a.top_k; ++j) {
    float best = -1.0f, best_p = 0.0f;  // rank key and probability of the best so far
    int best_e = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = lane + i * width;
      const float key = RankKey(p[i]);
      if (e < experts && !(taken & (1u << i)) && key > best) {  // own experts ascend: strict > keeps the lower
        best = key;
        best_p = p[i];
        best_e = e;
      }
    }
    for (int o = width / 2; o > 0; o /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, o, width);
      const float other_p = __shfl_xor_sync(0xffffffffu, best_p, o, width);
      const int other_e = __shfl_xor_sync(0xffffffffu, best_e, o, width);
      if (other > best || (other == best && other_e < best_e)) {
        best = other;
        best_p = other_p;
        best_e = other_e;
      }
    }
    if (best_e % width == lane) taken |= 1u << (best_e / width);
    if (valid && lane == 0) {
      a.weights[n * a.top_k + j] = best_p;
      a.indices[n * a.top_k + j] = best_e;
    }
    total += best_p;
  }
  if (a.normalize && valid && lane == 0) {
    for (int j = 0; j < a.top_k; ++j) a.weights[n * a.top_k + j] /= total;
  }
}

template <int kPer>
__global__ void RouterBackwardKernel(RouterBackwardArgs a, int width) {
  const int lane = threadIdx.x % width;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / width;
  const bool valid = n < a.tokens;
  const int experts = a.experts, k = a.top_k;

  float l[kPer], p[kPer], g[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane + i * width;
    l[i] = valid && e < experts ? a.logits[n * experts + e] : -INFINITY;
    g[i] = 0.0f;
  }
  if (!valid) l[0] = 0.0f;
  LaneSoftmax<kPer>(l, p, lane, width, experts);

  const int64_t row = valid ? n * k : 0;
  float shift = 0.0f, scale = 1.0f;
  if (a.normalize) {
    float selected = 0.0f, dot = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int e = a.indices[row + j];
      if (e % width == lane) {
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          if (i == e / width) selected += p[i];
        }
      }
      dot += a.grad_weights[row + j] * a.weights[row + j];
    }
    selected = GroupSum(selected, width);
    shift = dot;
    scale = 1.0f / selected;
  }
  for (int j = 0; j < k; ++j) {
    const int e = a.indices[row + j];
    if (e % width == lane) {
      const float gj = (a.grad_weights[row + j] - shift) * scale;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        if (i == e / width) g[i] = gj;
      }
    }
  }
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) dot += p[i] * g[i];
  dot = GroupSum(dot, width);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane + i * width;
    if (valid && e < experts) a.grad_logits[n * experts + e] = p[i] * (g[i] - dot);
  }
}

// Calls launch(std::integral_constant<int, kPer>) with the register array size the experts need.
template <typename Launch>
void WithLanes(int experts, Launch&& launch) {
  const int per = (experts + GroupWidth(experts) - 1) / GroupWidth(experts);
  if (per == 1) launch(std::integral_constant<int, 1>{});
  else if (per == 2) launch(std::integral_constant<int, 2>{});
  else if (per <= 4) launch(std::integral_constant<int, 4>{});
  else launch(std::integral_constant<int, 8>{});
  FLEXFED_CUDA_CHECK_LAUNCH();
}

unsigned Blocks(int64_t tokens, int width) { return static_cast<unsigned>((tokens * width + kBlock - 1) / kBlock); }

}  // namespace

void Router(const RouterArgs& a, cudaStream_t stream) {
  CheckShape("Router", a.tokens, a.experts, a.top_k);
  if (a.tokens == 0) return;
  const int width = GroupWidth(a.experts);
  WithLanes(a.experts, [&](auto per) {
    RouterForwardKernel<decltype(per)::value><<<Blocks(a.tokens, width), kBlock, 0, stream>>>(a, width);
  });
}

void RouterBackward(const RouterBackwardArgs& a, cudaStream_t stream) {
  CheckShape("RouterBackward", a.tokens, a.experts, a.top_k);
  if (a.tokens == 0) return;
  const int width = GroupWidth(a.experts);
  WithLanes(a.experts, [&](auto per) {
    RouterBackwardKernel<decltype(per)::value><<<Blocks(a.tokens, width), kBlock, 0, stream>>>(a, width);
  });
}

}  // namespace flexfed::kernels
