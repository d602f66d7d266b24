// Align/permute: a stable counting sort of the M = N·K routed slots by expert, then the gather.
//
// Algorithm (align), three launches on one stream:
//   1. Count: the slots are cut into chunks of kChunk; block b builds its chunk's histogram in
//      shared memory (atomics) and writes chunk_counts[e·chunks + b] (expert-major).
//   2. Scan: one 1024-thread block turns chunk_counts into an exclusive scan in place, tile by tile
//      (warp shuffles, then the warps' totals), so entry (e, b) becomes the first position of
//      expert e's slots from chunk b. offsets[e] is the entry (e, 0), offsets[E] = M, counts the
//      differences.
//   3. Scatter: block b walks its chunk again in tiles of 256 slots, in order. In each tile a slot's
//      rank among equal experts is: the count of its expert in earlier tiles (a running total in
//      shared memory) + in earlier warps of this tile (per-warp histograms) + in earlier lanes of its
//      warp (__match_any_sync and a popcount). Slots therefore keep their order within an expert
//      (stable), and the result is the same on every run.
// Gather: one warp per position p copies row sorted_slot[p] / K of x in 16-byte packs.
// Gather backward: the slot sum of slot_sum.cuh with unit weights (each token adds its K rows).
// Limits: E ≤ kMaxExperts (256; the shared histograms are [8][256] ints); M < 2³¹ (int32 positions);
// the scan is one block, fine for E · ⌈M / kChunk⌉ entries of any realistic size (a few thousand).
#include "kernels/moe_align.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.cuh"
#include "kernels/device_util.cuh"
#include "kernels/slot_sum.cuh"

namespace flexfed::kernels {
namespace {

constexpr int kChunk = 1024;  // slots per block: 32 blocks for the 1b owner step (32768 slots)
constexpr int kTile = 256;  // threads per block of the count and scatter kernels
constexpr int kWarps = kTile / 32;
constexpr int kScanBlock = 1024;

int64_t Chunks(int64_t slots) { return (slots + kChunk - 1) / kChunk; }

__global__ void CountKernel(const int32_t* __restrict__ indices, int64_t slots, int experts, int64_t chunks,
                            int32_t* __restrict__ chunk_counts) {
  __shared__ int hist[kMaxExperts];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(begin + kChunk, slots);
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) atomicAdd(&hist[indices[s]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) chunk_counts[e * chunks + blockIdx.x] = hist[e];
}

__global__ void ScanKernel(int32_t* __restrict__ values, int64_t total, int experts, int64_t chunks, int64_t slots,
                           int32_t* __restrict__ counts, int32_t* __restrict__ offsets) {
  __shared__ int warp_totals[32];
  __shared__ int carry;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < total; base += kScanBlock) {
    const int64_t i = base + threadIdx.x;
    const int v = i < total ? values[i] : 0;
    int inclusive = v;
    for (int o = 1; o < 32; o *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, o);
      if (lane >= o) inclusive += up;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      int t = warp_totals[lane];
      for (int o = 1; o < 32; o *= 2) {
        const int up = __shfl_up_sync(0xffffffffu, t, o);
        if (lane >= o) t += up;
      }
      warp_totals[lane] = t;  // inclusive over warps
    }
    __syncthreads();
    const int before = carry + (warp > 0 ? warp_totals[warp - 1] : 0);
    if (i < total) values[i] = before + inclusive - v;
    __syncthreads();
    if (threadIdx.x == 0) carry += warp_totals[31];
    __syncthreads();
  }
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    const int32_t first = values[e * chunks];
    const int32_t next = e + 1 < experts ? values[(e + 1) * chunks] : static_cast<int32_t>(slots);
    offsets[e] = first;
    counts[e] = next - first;
  }
  if (threadIdx.x == 0) offsets[experts] = static_cast<int32_t>(slots);
}

__global__ void ScatterKernel(const int32_t* __restrict__ indices, int64_t slots, int experts, int64_t chunks,
                              const int32_t* __restrict__ chunk_base, int32_t* __restrict__ sorted_slot,
                              int32_t* __restrict__ slot_position) {
  __shared__ int running[kMaxExperts];
  __shared__ int warp_hist[kWarps][kMaxExperts];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    running[e] = chunk_base[e * chunks + blockIdx.x];
    for (int w = 0; w < kWarps; ++w) warp_hist[w][e] = 0;
  }
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(begin + kChunk, slots);
  const unsigned lanes_before = (1u << lane) - 1;
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int64_t s = tile + threadIdx.x;
    const bool valid = s < end;
    const int e = valid ? indices[s] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & lanes_before);
    if (valid && rank == 0) warp_hist[warp][e] = __popc(peers);
    __syncthreads();
    if (valid) {
      int position = running[e] + rank;
      for (int w = 0; w < warp; ++w) position += warp_hist[w][e];
      sorted_slot[position] = static_cast<int32_t>(s);
      slot_position[s] = position;
    }
    __syncthreads();
    for (int x = threadIdx.x; x < experts; x += blockDim.x) {
      int tile_count = 0;
      for (int w = 0; w < kWarps; ++w) {
        tile_count += warp_hist[w][x];
        warp_hist[w][x] = 0;
      }
      running[x] += tile_count;
    }
    __syncthreads();
  }
}

template <typename V>
__global__ void GatherKernel(const V* __restrict__ x, const int32_t* __restrict__ sorted_slot, V* __restrict__ rows,
                             int64_t slots, int64_t units, int top_k) {
  const int lane = threadIdx.x % 32;
  const int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (p >= slots) return;
  const V* src = x + static_cast<int64_t>(sorted_slot[p] / top_k) * units;
  V* dst = rows + p * units;
  for (int64_t q = lane; q < units; q += 32) dst[q] = src[q];
}

template <typename V>
void LaunchGather(const GatherArgs& a, unsigned blocks, int block, size_t row_bytes, cudaStream_t stream) {
  GatherKernel<V><<<blocks, block, 0, stream>>>(static_cast<const V*>(a.x), a.sorted_slot, static_cast<V*>(a.rows),
                                                a.slots, static_cast<int64_t>(row_bytes / sizeof(V)), a.top_k);
}

void CheckExperts(const char* op, int experts) {
  if (experts < 1 || experts > kMaxExperts) {
    throw std::invalid_argument(std::string(op) + ": experts must be in [1, " + std::to_string(kMaxExperts) +
                                "], got " + std::to_string(experts));
  }
}

}  // namespace

size_t AlignWorkspaceBytes(int64_t slots, int experts) {
  return sizeof(int32_t) * static_cast<size_t>(experts) * static_cast<size_t>(std::max<int64_t>(1, Chunks(slots)));
}

void Align(const AlignArgs& a, cudaStream_t stream) {
  CheckExperts("Align", a.experts);
  if (a.slots < 0 || a.slots >= (int64_t{1} << 31)) throw std::invalid_argument("Align: slot count must be in [0, 2^31)");
  if (a.slots == 0) {
    FLEXFED_CUDA_CHECK(cudaMemsetAsync(a.counts, 0, sizeof(int32_t) * a.experts, stream));
    FLEXFED_CUDA_CHECK(cudaMemsetAsync(a.offsets, 0, sizeof(int32_t) * (a.experts + 1), stream));
    return;
  }
  const int64_t chunks = Chunks(a.slots);
  int32_t* chunk_counts = static_cast<int32_t*>(a.workspace);
  CountKernel<<<static_cast<unsigned>(chunks), kTile, 0, stream>>>(a.indices, a.slots, a.experts, chunks, chunk_counts);
  FLEXFED_CUDA_CHECK_LAUNCH();
  ScanKernel<<<1, kScanBlock, 0, stream>>>(chunk_counts, chunks * a.experts, a.experts, chunks, a.slots, a.counts,
                                           a.offsets);
  FLEXFED_CUDA_CHECK_LAUNCH();
  ScatterKernel<<<static_cast<unsigned>(chunks), kTile, 0, stream>>>(a.indices, a.slots, a.experts, chunks,
                                                                     chunk_counts, a.sorted_slot, a.slot_position);
  FLEXFED_CUDA_CHECK_LAUNCH();
}

void Gather(const GatherArgs& a, cudaStream_t stream) {
  if (a.top_k < 1) throw std::invalid_argument("Gather: top_k must be at least 1");
  if (a.slots == 0 || a.hidden == 0) return;
  constexpr int kBlock = 256, kRowsPerBlock = kBlock / 32;
  const unsigned blocks = static_cast<unsigned>((a.slots + kRowsPerBlock - 1) / kRowsPerBlock);
  const size_t row_bytes = static_cast<size_t>(a.hidden) * DTypeSize(a.dtype);
  const void* ptrs[] = {a.x, a.rows};
  const int align = RowAlignment(row_bytes, ptrs, 2);
  if (align == 16) {
    LaunchGather<Pack<uint32_t, 4>>(a, blocks, kBlock, row_bytes, stream);
  } else if (align >= 4) {
    LaunchGather<uint32_t>(a, blocks, kBlock, row_bytes, stream);
  } else if (align == 2) {
    LaunchGather<uint16_t>(a, blocks, kBlock, row_bytes, stream);
  } else {
    LaunchGather<unsigned char>(a, blocks, kBlock, row_bytes, stream);
  }
  FLEXFED_CUDA_CHECK_LAUNCH();
}

void GatherBackward(const GatherBackwardArgs& a, cudaStream_t stream) {
  if (a.top_k < 1) throw std::invalid_argument("GatherBackward: top_k must be at least 1");
  if (a.dtype == DType::kF32) {
    LaunchSlotSum<float>(a.grad_rows, nullptr, a.slot_position, a.grad_x, a.tokens, a.hidden, a.top_k, stream);
  } else {
    LaunchSlotSum<__nv_bfloat16>(a.grad_rows, nullptr, a.slot_position, a.grad_x, a.tokens, a.hidden, a.top_k, stream);
  }
}

}  // namespace flexfed::kernels
