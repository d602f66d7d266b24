// Device helpers the kernels share: dtype conversion, vector loads, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace flexfed::kernels {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kN elements of T moved as one aligned access (16 bytes for kN = 16 / sizeof(T)).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

// The widest access (16, 8, 4, 2 or 1 bytes) that rows of `row_bytes` starting at each of `ptrs` allow.
inline int RowAlignment(size_t row_bytes, const void* const* ptrs, int count) {
  for (int w = 16; w > 1; w /= 2) {
    bool ok = row_bytes % w == 0;
    for (int i = 0; ok && i < count; ++i) ok = reinterpret_cast<uintptr_t>(ptrs[i]) % w == 0;
    if (ok) return w;
  }
  return 1;
}

// The pack width in elements for rows of `row_elems` T: 16 bytes' worth when every row and pointer
// is 16-byte aligned, else 1.
template <typename T>
inline int PackWidth(int64_t row_elems, const void* const* ptrs, int count) {
  return RowAlignment(static_cast<size_t>(row_elems) * sizeof(T), ptrs, count) == 16 ? 16 / sizeof(T) : 1;
}

// Reductions over a group of `width` lanes (a power of two ≤ 32) inside one warp.
__device__ __forceinline__ float GroupMax(float v, int width) {
  for (int o = width / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o, width));
  return v;
}
__device__ __forceinline__ float GroupSum(float v, int width) {
  for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, width);
  return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = GroupSum(v, 32);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : 0.0f;
  return GroupSum(v, 32);
}

}  // namespace flexfed::kernels
