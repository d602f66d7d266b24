// Combine: out[n] = Σ_j w[n, j] · rows[position of slot (n, j)], and its backward.
//
// Algorithm (forward): the slot sum of slot_sum.cuh: one warp per token walks its K slots in order,
// reading each slot's row (16-byte packs, fp32 accumulators per lane) and writing the token's row
// once. No atomics: every output row has one writer, so the result is deterministic.
// Algorithm (backward), one warp per position p (rows in position order, so writes are contiguous):
//   1. s = sorted_slot[p], n = s / K, w = weights[s];
//   2. each lane, pack by pack: grad_rows[p] = w · grad_out[n], and a partial dot of grad_out[n]
//      with rows[p] in fp32;
//   3. a warp shuffle reduction gives grad_weights[s] (one writer per slot).
// Limits: rows must be [M, H] contiguous; 16-byte packs need H·sizeof(T) % 16 == 0 and aligned
// pointers, otherwise elements move one at a time (correct, slower).
#include "kernels/moe_combine.cuh"

#include <stdexcept>

#include "kernels/cuda_check.cuh"
#include "kernels/device_util.cuh"
#include "kernels/slot_sum.cuh"

namespace flexfed::kernels {
namespace {

template <typename T, int kN>
__global__ void CombineBackwardKernel(const T* __restrict__ grad_out, const T* __restrict__ rows,
                                      const float* __restrict__ weights, const int32_t* __restrict__ sorted_slot,
                                      T* __restrict__ grad_rows, float* __restrict__ grad_weights, int64_t slots,
                                      int64_t hidden, int top_k) {
  const int lane = threadIdx.x % 32;
  const int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (p >= slots) return;  // whole warps leave together: p is uniform across a warp
  const int64_t s = sorted_slot[p], n = s / top_k;
  const float w = weights[s];
  const Pack<T, kN>* go = reinterpret_cast<const Pack<T, kN>*>(grad_out + n * hidden);
  const Pack<T, kN>* y = reinterpret_cast<const Pack<T, kN>*>(rows + p * hidden);
  Pack<T, kN>* gy = reinterpret_cast<Pack<T, kN>*>(grad_rows + p * hidden);
  float dot = 0.0f;
  for (int64_t q = lane; q < hidden / kN; q += 32) {
    const Pack<T, kN> g = go[q], v = y[q];
    Pack<T, kN> o;
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const float gf = ToFloat(g.v[i]);
      o.v[i] = FromFloat<T>(w * gf);
      dot += gf * ToFloat(v.v[i]);
    }
    gy[q] = o;
  }
  dot = GroupSum(dot, 32);
  if (lane == 0) grad_weights[s] = dot;
}

template <typename T>
void LaunchCombineBackward(const CombineBackwardArgs& a, cudaStream_t stream) {
  constexpr int kBlock = 256, kRowsPerBlock = kBlock / 32;
  const unsigned blocks = static_cast<unsigned>((a.slots + kRowsPerBlock - 1) / kRowsPerBlock);
  const void* ptrs[] = {a.grad_out, a.rows, a.grad_rows};
  const T* go = static_cast<const T*>(a.grad_out);
  const T* rows = static_cast<const T*>(a.rows);
  T* gr = static_cast<T*>(a.grad_rows);
  if (PackWidth<T>(a.hidden, ptrs, 3) > 1) {
    CombineBackwardKernel<T, 16 / sizeof(T)><<<blocks, kBlock, 0, stream>>>(go, rows, a.weights, a.sorted_slot, gr,
                                                                            a.grad_weights, a.slots, a.hidden, a.top_k);
  } else {
    CombineBackwardKernel<T, 1><<<blocks, kBlock, 0, stream>>>(go, rows, a.weights, a.sorted_slot, gr, a.grad_weights,
                                                               a.slots, a.hidden, a.top_k);
  }
  FLEXFED_CUDA_CHECK_LAUNCH();
}

}  // namespace

void Combine(const CombineArgs& a, cudaStream_t stream) {
  if (a.top_k < 1) throw std::invalid_argument("Combine: top_k must be at least 1");
  if (a.dtype == DType::kF32) {
    LaunchSlotSum<float>(a.rows, a.weights, a.slot_position, a.out, a.tokens, a.hidden, a.top_k, stream);
  } else {
    LaunchSlotSum<__nv_bfloat16>(a.rows, a.weights, a.slot_position, a.out, a.tokens, a.hidden, a.top_k, stream);
  }
}

void CombineBackward(const CombineBackwardArgs& a, cudaStream_t stream) {
  if (a.top_k < 1) throw std::invalid_argument("CombineBackward: top_k must be at least 1");
  if (a.slots == 0) return;
  if (a.hidden == 0) {
    FLEXFED_CUDA_CHECK(cudaMemsetAsync(a.grad_weights, 0, sizeof(float) * a.slots, stream));
    return;
  }
  if (a.dtype == DType::kF32) {
    LaunchCombineBackward<float>(a, stream);
  } else {
    LaunchCombineBackward<__nv_bfloat16>(a, stream);
  }
}

}  // namespace flexfed::kernels
