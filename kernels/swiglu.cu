// SwiGLU activation: out = silu(g) · u = g · sigmoid(g) · u, and its backward.
//
// Algorithm: elementwise over the flat [count] buffers, grid-stride:
//   1. each thread loads 16-byte packs of gate and up (8 bf16 or 4 fp32 values),
//   2. computes in fp32: s = 1 / (1 + exp(-g)); out = g · s · u
//      (backward: grad_gate = go · u · s · (1 + g · (1 − s)), grad_up = go · g · s),
//   3. rounds once and stores packs. Reading gate+up and writing out is the whole cost, so the
//      kernel is memory-bound: one pass, no intermediate buffer (unlike silu(g) then · u).
// Limits: packs need count % (16 / sizeof(T)) == 0 and 16-byte aligned pointers; otherwise one
// element per access (correct, slower). The grid is capped at 65535 · 4 blocks and strides.
#include "kernels/swiglu.cuh"

#include <algorithm>

#include "kernels/cuda_check.cuh"
#include "kernels/device_util.cuh"

namespace flexfed::kernels {
namespace {

constexpr int kBlock = 256;

__device__ __forceinline__ float Sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T, int kN>
__global__ void SwiGluKernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t packs) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < packs;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, kN> g = reinterpret_cast<const Pack<T, kN>*>(gate)[q];
    const Pack<T, kN> u = reinterpret_cast<const Pack<T, kN>*>(up)[q];
    Pack<T, kN> o;
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const float gf = ToFloat(g.v[i]);
      o.v[i] = FromFloat<T>(gf * Sigmoid(gf) * ToFloat(u.v[i]));
    }
    reinterpret_cast<Pack<T, kN>*>(out)[q] = o;
  }
}

template <typename T, int kN>
__global__ void SwiGluBackwardKernel(const T* __restrict__ grad_out, const T* __restrict__ gate,
                                     const T* __restrict__ up, T* __restrict__ grad_gate, T* __restrict__ grad_up,
                                     int64_t packs) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < packs;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, kN> go = reinterpret_cast<const Pack<T, kN>*>(grad_out)[q];
    const Pack<T, kN> g = reinterpret_cast<const Pack<T, kN>*>(gate)[q];
    const Pack<T, kN> u = reinterpret_cast<const Pack<T, kN>*>(up)[q];
    Pack<T, kN> dg, du;
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const float gof = ToFloat(go.v[i]), gf = ToFloat(g.v[i]), uf = ToFloat(u.v[i]);
      const float s = Sigmoid(gf);
      dg.v[i] = FromFloat<T>(gof * uf * s * (1.0f + gf * (1.0f - s)));
      du.v[i] = FromFloat<T>(gof * gf * s);
    }
    reinterpret_cast<Pack<T, kN>*>(grad_gate)[q] = dg;
    reinterpret_cast<Pack<T, kN>*>(grad_up)[q] = du;
  }
}

unsigned Blocks(int64_t packs) {
  return static_cast<unsigned>(std::min<int64_t>((packs + kBlock - 1) / kBlock, 65535 * 4));
}

template <typename T>
void LaunchForward(const SwiGluArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.gate, a.up, a.out};
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  T* o = static_cast<T*>(a.out);
  constexpr int kWide = 16 / sizeof(T);
  if (PackWidth<T>(a.count, ptrs, 3) > 1) {
    SwiGluKernel<T, kWide><<<Blocks(a.count / kWide), kBlock, 0, stream>>>(g, u, o, a.count / kWide);
  } else {
    SwiGluKernel<T, 1><<<Blocks(a.count), kBlock, 0, stream>>>(g, u, o, a.count);
  }
  FLEXFED_CUDA_CHECK_LAUNCH();
}

template <typename T>
void LaunchBackward(const SwiGluBackwardArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.grad_out, a.gate, a.up, a.grad_gate, a.grad_up};
  const T* go = static_cast<const T*>(a.grad_out);
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  T* dg = static_cast<T*>(a.grad_gate);
  T* du = static_cast<T*>(a.grad_up);
  constexpr int kWide = 16 / sizeof(T);
  if (PackWidth<T>(a.count, ptrs, 5) > 1) {
    SwiGluBackwardKernel<T, kWide><<<Blocks(a.count / kWide), kBlock, 0, stream>>>(go, g, u, dg, du, a.count / kWide);
  } else {
    SwiGluBackwardKernel<T, 1><<<Blocks(a.count), kBlock, 0, stream>>>(go, g, u, dg, du, a.count);
  }
  FLEXFED_CUDA_CHECK_LAUNCH();
}

}  // namespace

void SwiGlu(const SwiGluArgs& a, cudaStream_t stream) {
  if (a.count == 0) return;
  if (a.dtype == DType::kF32) {
    LaunchForward<float>(a, stream);
  } else {
    LaunchForward<__nv_bfloat16>(a, stream);
  }
}

void SwiGluBackward(const SwiGluBackwardArgs& a, cudaStream_t stream) {
  if (a.count == 0) return;
  if (a.dtype == DType::kF32) {
    LaunchBackward<float>(a, stream);
  } else {
    LaunchBackward<__nv_bfloat16>(a, stream);
  }
}

}  // namespace flexfed::kernels
