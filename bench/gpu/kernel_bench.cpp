// MoE kernel bandwidth benchmark (torch-free): each kernel of kernels/ on the 1b owner-training
// shapes (docs/ARCHITECTURE.md §8), its achieved GB/s (bytes it must read and write / time) against the
// device-to-device copy bandwidth measured in the same run. One JSON line per kernel; bench/gpu/run.sh
// turns them into the table of docs/PERFORMANCE.md.
#include <CLI/CLI.hpp>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cstdio>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_check.cuh"
#include "kernels/moe_align.cuh"
#include "kernels/moe_combine.cuh"
#include "kernels/moe_router.cuh"
#include "kernels/swiglu.cuh"
#include "kernels/adamw.cuh"
#include <nlohmann/json.hpp>

namespace k = flexfed::kernels;

namespace {

// Device memory filled with small random values of the element type (bytes are what matter here,
// but kernels must not see NaNs or denormals).
void* Random(size_t bytes, bool bf16, uint32_t seed) {
  std::vector<uint16_t> host(bytes / 2);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  if (bf16) {
    for (uint16_t& h : host) h = k::FloatToBf16(d(rng));
  } else {
    std::vector<float> f(bytes / 4);
    for (float& x : f) x = d(rng);
    std::memcpy(host.data(), f.data(), bytes);
  }
  void* p = nullptr;
  FLEXFED_CUDA_CHECK(cudaMalloc(&p, bytes));
  FLEXFED_CUDA_CHECK(cudaMemcpy(p, host.data(), bytes, cudaMemcpyHostToDevice));
  return p;
}

// Median seconds of `reps` runs of `fn` after 3 warm-ups, timed by CUDA events.
double Time(const std::function<void()>& fn, int reps = 20) {
  cudaEvent_t start, stop;
  FLEXFED_CUDA_CHECK(cudaEventCreate(&start));
  FLEXFED_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> s;
  for (int i = 0; i < reps; ++i) {
    FLEXFED_CUDA_CHECK(cudaEventRecord(start));
    fn();
    FLEXFED_CUDA_CHECK(cudaEventRecord(stop));
    FLEXFED_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    FLEXFED_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    s.push_back(ms / 1e3);
  }
  FLEXFED_CUDA_CHECK(cudaEventDestroy(start));
  FLEXFED_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(s.begin(), s.end());
  return s[s.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"FlexFed MoE kernel bandwidth benchmark (JSON lines); see bench/gpu/README.md"};
  int64_t tokens = 16384, hidden = 2048, ffn = 8192;
  int experts = 2, top_k = 2;
  std::string dtype = "bf16";
  app.add_option("--tokens", tokens, "Tokens per MoE call (batch × sequence)");
  app.add_option("--hidden", hidden, "Hidden size");
  app.add_option("--ffn", ffn, "FFN width");
  app.add_option("--experts", experts, "Experts (2 while an owner trains)");
  app.add_option("--top-k", top_k, "Experts per token");
  app.add_option("--dtype", dtype, "Hidden-state dtype")->check(CLI::IsMember({"bf16", "fp32"}));
  CLI11_PARSE(app, argc, argv);

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::cerr << "kernel_bench: no CUDA device; run it on a machine with a GPU\n";
    return 1;
  }
  cudaDeviceProp prop{};
  FLEXFED_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const bool bf16 = dtype == "bf16";
  const k::DType t = bf16 ? k::DType::kBF16 : k::DType::kF32;
  const size_t es = k::DTypeSize(t);
  const int64_t n = tokens, h = hidden, m = tokens * top_k, e = experts;

  // The baseline: a device-to-device copy of 1 GiB, bytes read + written.
  const size_t copy_bytes = size_t{1} << 30;
  void *src = nullptr, *dst = nullptr;
  FLEXFED_CUDA_CHECK(cudaMalloc(&src, copy_bytes));
  FLEXFED_CUDA_CHECK(cudaMalloc(&dst, copy_bytes));
  const double copy_s = Time([&] { FLEXFED_CUDA_CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice)); });
  const double copy_bw = 2.0 * copy_bytes / copy_s;
  FLEXFED_CUDA_CHECK(cudaFree(src));
  FLEXFED_CUDA_CHECK(cudaFree(dst));

  // Inputs: router logits, a routing from the router itself, hidden states, expert outputs.
  float* logits = static_cast<float*>(Random(n * e * 4, false, 1));
  float* logits_out = static_cast<float*>(Random(n * e * 4, false, 2));
  float* weights = static_cast<float*>(Random(m * 4, false, 3));
  float* grad_weights = static_cast<float*>(Random(m * 4, false, 4));
  float* grad_logits = static_cast<float*>(Random(n * e * 4, false, 5));
  int32_t *indices, *counts, *offsets, *sorted, *position;
  FLEXFED_CUDA_CHECK(cudaMalloc(&indices, m * 4));
  FLEXFED_CUDA_CHECK(cudaMalloc(&counts, e * 4));
  FLEXFED_CUDA_CHECK(cudaMalloc(&offsets, (e + 1) * 4));
  FLEXFED_CUDA_CHECK(cudaMalloc(&sorted, m * 4));
  FLEXFED_CUDA_CHECK(cudaMalloc(&position, m * 4));
  void* workspace = nullptr;
  FLEXFED_CUDA_CHECK(cudaMalloc(&workspace, k::AlignWorkspaceBytes(m, experts)));
  void* x = Random(n * h * es, bf16, 6);
  void* rows = Random(m * h * es, bf16, 7);
  void* grad_rows = Random(m * h * es, bf16, 8);
  void* out = Random(n * h * es, bf16, 9);
  void* gate = Random(m * ffn * es, bf16, 10);
  void* up = Random(m * ffn * es, bf16, 11);
  void* act = Random(m * ffn * es, bf16, 12);
  void* grad_gate = Random(m * ffn * es, bf16, 13);
  void* grad_up = Random(m * ffn * es, bf16, 14);

  // AdamW with bf16 moments over one layer's trained expert (gate, up, down): fp32 weights and
  // gradients; the second moment starts at zero (a square root of a negative would do as well).
  const int64_t params = 3 * ffn * h;
  float* master = static_cast<float*>(Random(params * 4, false, 15));
  float* grad = static_cast<float*>(Random(params * 4, false, 16));
  void* exp_avg = Random(params * 2, true, 17);
  void* exp_avg_sq = nullptr;
  FLEXFED_CUDA_CHECK(cudaMalloc(&exp_avg_sq, params * 2));
  FLEXFED_CUDA_CHECK(cudaMemset(exp_avg_sq, 0, params * 2));
  k::AdamWArgs adamw = k::AdamWStepScalars(1e-6, 0.9, 0.95, 1e-8, 0.1, 10);
  adamw.param = master;
  adamw.grad = grad;
  adamw.exp_avg = exp_avg;
  adamw.exp_avg_sq = exp_avg_sq;
  adamw.count = params;
  adamw.moments = k::DType::kBF16;

  const k::RouterArgs router{logits, nullptr, nullptr, logits_out, weights, indices, n, experts, top_k, false};
  k::Router(router, nullptr);
  const k::AlignArgs align{indices, counts, offsets, sorted, position, workspace, m, experts};
  k::Align(align, nullptr);
  FLEXFED_CUDA_CHECK(cudaDeviceSynchronize());

  struct Row {
    std::string kernel;
    double bytes;
    std::function<void()> run;
  };
  const double hs = static_cast<double>(h) * es, fs = static_cast<double>(ffn) * es;
  const std::vector<Row> table = {
      {"router", n * e * 8.0 + m * 8.0, [&] { k::Router(router, nullptr); }},
      {"router_backward", n * e * 8.0 + m * 12.0,
       [&] { k::RouterBackward({logits_out, indices, weights, grad_weights, grad_logits, n, experts, top_k, false}, nullptr); }},
      {"align", m * 16.0, [&] { k::Align(align, nullptr); }},
      {"gather", 2.0 * m * hs, [&] { k::Gather({x, sorted, rows, m, h, top_k, t}, nullptr); }},
      {"gather_backward", m * hs + n * hs, [&] { k::GatherBackward({grad_rows, position, out, n, h, top_k, t}, nullptr); }},
      {"combine", m * hs + n * hs + m * 8.0, [&] { k::Combine({rows, weights, position, out, n, h, top_k, t}, nullptr); }},
      {"combine_backward", 3.0 * m * hs + m * 8.0,
       [&] { k::CombineBackward({out, rows, weights, sorted, grad_rows, grad_weights, m, h, top_k, t}, nullptr); }},
      {"swiglu", 3.0 * m * fs, [&] { k::SwiGlu({gate, up, act, m * ffn, t}, nullptr); }},
      {"swiglu_backward", 5.0 * m * fs,
       [&] { k::SwiGluBackward({act, gate, up, grad_gate, grad_up, m * ffn, t}, nullptr); }},
      {"adamw_bf16_moments", 22.0 * params, [&] { k::AdamW(adamw, nullptr); }},
  };
  nlohmann::json base = {{"device", prop.name}, {"tokens", n}, {"hidden", h}, {"ffn", ffn}, {"experts", experts},
                         {"top_k", top_k}, {"dtype", dtype}, {"copy_gb_per_s", copy_bw / 1e9}};
  for (const Row& r : table) {
    const double s = Time(r.run);
    nlohmann::json j = base;
    j.update({{"kernel", r.kernel}, {"seconds", s}, {"bytes", r.bytes}, {"gb_per_s", r.bytes / s / 1e9},
              {"of_copy", r.bytes / s / copy_bw}});
    std::cout << j.dump() << std::endl;
  }
  return 0;
}
