// MoE layer benchmark: forward + backward of one MoE block through the dispatch path
// (common/model/moe_dispatch.h: the CUDA kernels on a GPU) against the plain LibTorch layer (moe.h:
// Route + CombineExperts, experts grouped on the host), same inputs, same process, alternated.
// As in owner training: fp32 master weights under bf16 autocast on a GPU. One JSON line per
// configuration; bench/gpu/run.sh prints them with the kernels' share of the layer's time.
// On the CPU it runs too (the dispatch path then uses the kernels' CPU references).
#include <CLI/CLI.hpp>
#include <torch/cuda.h>

#include <chrono>
#include <iostream>
#include <optional>

#include "common/model/autocast.h"
#include "common/model/model.h"
#include "common/model/moe.h"
#include "common/model/moe_dispatch.h"
#include <nlohmann/json.hpp>

using namespace flexfed;

int main(int argc, char** argv) {
  CLI::App app{"FlexFed MoE layer forward+backward benchmark (JSON lines); see bench/gpu/README.md"};
  int64_t tokens = 16384, hidden = 2048, ffn = 8192, reps = 10;
  std::vector<std::string> configs = {"2x2", "4x2"};
  std::string device = "cuda";
  int threads = 0;
  app.add_option("--tokens", tokens, "Tokens per call (batch × sequence)");
  app.add_option("--hidden", hidden, "Hidden size");
  app.add_option("--ffn", ffn, "FFN width");
  app.add_option("--experts", configs, "EXPERTSxTOP_K, one line each (2x2: an owner training)");
  app.add_option("--device", device, "cuda or cpu")->check(CLI::IsMember({"cuda", "cpu"}));
  app.add_option("--reps", reps, "Timed repetitions (best is reported)");
  app.add_option("--threads", threads, "CPU threads (0 = all cores)");
  CLI11_PARSE(app, argc, argv);
  SetCpuThreads(threads);
  const bool cuda = device == "cuda";
  if (cuda && !torch::cuda::is_available()) {
    std::cerr << "moe_bench: no CUDA device (or a CPU-only LibTorch); use --device cpu or a GPU machine\n";
    return 1;
  }
  const at::TensorOptions o = at::TensorOptions().device(cuda ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU));
  auto sync = [&] {
    if (cuda) torch::cuda::synchronize();
  };

  for (const std::string& config : configs) {
    int64_t experts = 0, top_k = 0;
    if (std::sscanf(config.c_str(), "%ldx%ld", &experts, &top_k) != 2 || top_k < 1 || top_k > experts) {
      std::cerr << "--experts " << config << ": expected EXPERTSxTOP_K with 1 ≤ TOP_K ≤ EXPERTS\n";
      return 2;
    }
    at::manual_seed(1);
    const at::Tensor x = at::randn({tokens, hidden}, o).requires_grad_();
    const at::Tensor router = (at::randn({experts, hidden}, o) * 0.02).requires_grad_();
    const at::Tensor bias = at::zeros({experts}, o).requires_grad_();
    std::vector<ExpertWeights> w;
    for (int64_t e = 0; e < experts; ++e) {
      w.push_back({(at::randn({ffn, hidden}, o) * 0.02).requires_grad_(), (at::randn({ffn, hidden}, o) * 0.02).requires_grad_(),
                   (at::randn({hidden, ffn}, o) * 0.02).requires_grad_()});
    }
    const at::Tensor probe = at::randn({tokens, hidden}, o);
    auto layer = [&](bool dispatch) {
      at::Tensor out;
      {
        std::optional<AutocastScope> autocast;
        if (cuda) autocast.emplace(at::kCUDA, at::kBFloat16);
        if (dispatch) {
          out = DispatchMoe(x, router, bias, {}, top_k, false, w).out;
        } else {
          out = CombineExperts(x, w, Route(x, router, bias, {}, top_k, false));
        }
      }
      (out.to(at::kFloat) * probe).sum().backward();
    };
    double best[2] = {1e30, 1e30};
    for (int i = 0; i < reps + 2; ++i) {
      for (int dispatch = 0; dispatch < 2; ++dispatch) {  // alternated, so drift hits both alike
        sync();
        const auto start = std::chrono::steady_clock::now();
        layer(dispatch == 1);
        sync();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (i >= 2) best[dispatch] = std::min(best[dispatch], s);
      }
    }
    const double flops = 3.0 * 2.0 * 3.0 * static_cast<double>(tokens * top_k) * hidden * ffn;  // fwd + 2 bwd GEMMs
    nlohmann::json j = {{"device", cuda ? "cuda" : "cpu"}, {"tokens", tokens}, {"hidden", hidden}, {"ffn", ffn},
                        {"experts", experts}, {"top_k", top_k}, {"libtorch_seconds", best[0]},
                        {"dispatch_seconds", best[1]}, {"speedup", best[0] / best[1]},
                        {"dispatch_tflops", flops / best[1] / 1e12}};
    std::cout << j.dump() << std::endl;
  }
  return 0;
}
