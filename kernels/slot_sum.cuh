// The slot sum that the combine and the gather's adjoint share (device code, included by
// moe_combine.cu and moe_align.cu):
//   out[n] = Σ_j w_j · rows[slot_position[n·K + j]]   (w_j = weights[n·K + j], or 1 without weights)
// summed in fp32 in slot order j = 0 … K-1 and rounded once to T.
// Layout: one warp per token; each lane moves kN-element packs (16 bytes when rows allow) of the
// H-wide rows, so a warp reads 512 contiguous bytes of a row per step.
#pragma once

#include <cstdint>

#include "kernels/cuda_check.cuh"
#include "kernels/device_util.cuh"

namespace flexfed::kernels {

template <typename T, int kN>
__global__ void SlotSumKernel(const T* __restrict__ rows, const float* __restrict__ weights,
                              const int32_t* __restrict__ slot_position, T* __restrict__ out, int64_t tokens,
                              int64_t hidden, int top_k) {
  const int lane = threadIdx.x % 32;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (n >= tokens) return;
  const int64_t packs = hidden / kN;
  for (int64_t q = lane; q < packs; q += 32) {
    float acc[kN];
#pragma unroll
    for (int i = 0; i < kN; ++i) acc[i] = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const int64_t s = n * top_k + j;
      const float w = weights != nullptr ? weights[s] : 1.0f;
      const Pack<T, kN> v = reinterpret_cast<const Pack<T, kN>*>(rows + slot_position[s] * hidden)[q];
#pragma unroll
      for (int i = 0; i < kN; ++i) acc[i] += w * ToFloat(v.v[i]);
    }
    Pack<T, kN> o;
#pragma unroll
    for (int i = 0; i < kN; ++i) o.v[i] = FromFloat<T>(acc[i]);
    reinterpret_cast<Pack<T, kN>*>(out + n * hidden)[q] = o;
  }
}

template <typename T>
void LaunchSlotSum(const void* rows, const float* weights, const int32_t* slot_position, void* out, int64_t tokens,
                   int64_t hidden, int top_k, cudaStream_t stream) {
  if (tokens == 0 || hidden == 0) return;
  constexpr int kBlock = 256, kTokensPerBlock = kBlock / 32;
  const unsigned blocks = static_cast<unsigned>((tokens + kTokensPerBlock - 1) / kTokensPerBlock);
  const void* ptrs[] = {rows, out};
  const T* r = static_cast<const T*>(rows);
  T* o = static_cast<T*>(out);
  if (PackWidth<T>(hidden, ptrs, 2) > 1) {
    SlotSumKernel<T, 16 / sizeof(T)><<<blocks, kBlock, 0, stream>>>(r, weights, slot_position, o, tokens, hidden, top_k);
  } else {
    SlotSumKernel<T, 1><<<blocks, kBlock, 0, stream>>>(r, weights, slot_position, o, tokens, hidden, top_k);
  }
  FLEXFED_CUDA_CHECK_LAUNCH();
}

}  // namespace flexfed::kernels
