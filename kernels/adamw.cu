// AdamW update: p, m, v ← AdamW(p, g, m, v) elementwise (kernels/adamw_ops.h).
//
// Algorithm: one grid-stride pass over the flat [count] buffers; each thread
//   1. loads g, p, m, v (m, v widened from bf16 when the moments are bf16),
//   2. updates in fp32 in the reference's order: m·β1 + g·c1, v·β2 + g²·c2, the optional decay of p,
//      p − step_size·m / (√v / bias2_sqrt + ε),
//   3. stores p, m, v (m, v rounded to nearest even when bf16).
// Reading p, g, m, v and writing p, m, v is the whole cost (22 bytes an element with bf16 moments):
// memory-bound, one pass, where the ATen composition makes about twelve. Consecutive threads touch
// consecutive elements, so every access is coalesced. The grid is capped at 65535 · 4 blocks.
#include "kernels/adamw.cuh"

#include <algorithm>

#include "kernels/cuda_check.cuh"
#include "kernels/device_util.cuh"

namespace flexfed::kernels {
namespace {

constexpr int kBlock = 256;

template <typename M>
__global__ void AdamWKernel(float* __restrict__ p, const float* __restrict__ g, M* __restrict__ m, M* __restrict__ v,
                            int64_t count, float beta1, float beta2, float c1, float c2, float eps, float decay,
                            float step_size, float bias2_sqrt) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float mi = ToFloat(m[i]) * beta1 + gi * c1;
    const float vi = ToFloat(v[i]) * beta2 + gi * gi * c2;
    const float pi = decay != 1.0f ? p[i] * decay : p[i];
    p[i] = pi - step_size * mi / (sqrtf(vi) / bias2_sqrt + eps);
    m[i] = FromFloat<M>(mi);
    v[i] = FromFloat<M>(vi);
  }
}

template <typename M>
void Launch(const AdamWArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((a.count + kBlock - 1) / kBlock, 65535 * 4));
  AdamWKernel<M><<<blocks, kBlock, 0, stream>>>(a.param, a.grad, static_cast<M*>(a.exp_avg), static_cast<M*>(a.exp_avg_sq),
                                                a.count, a.beta1, a.beta2, a.c1, a.c2, a.eps, a.decay, a.step_size,
                                                a.bias2_sqrt);
  FLEXFED_CUDA_CHECK_LAUNCH();
}

}  // namespace

void AdamW(const AdamWArgs& a, cudaStream_t stream) {
  if (a.count <= 0) return;
  if (a.moments == DType::kF32) {
    Launch<float>(a, stream);
  } else {
    Launch<__nv_bfloat16>(a, stream);
  }
}

}  // namespace flexfed::kernels
