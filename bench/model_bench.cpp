// Model benchmark, FlexFed side (times are the best of several runs: the machine is shared, and
// noise only ever adds time): forward+backward throughput and KV-cache decoding for the `tiny`
// and `small` configs, with the machine's fp32 GEMM rate measured in the same process. Prints one
// JSON object per measurement; bench/run_model_bench.sh runs it beside bench/model_bench.py (the
// same model in plain PyTorch) and prints the comparison. Keep the two in step.
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <iostream>

#include "common/model/model.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

template <typename F>
double BestSeconds(int warmup, int reps, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto a = Clock::now();
    f();
    t.push_back(Seconds(a, Clock::now()));
  }
  return *std::min_element(t.begin(), t.end());
}

// fp32 GEMM FLOP/s on the shape that dominates a training step: [tokens, H] × [H, F].
double GemmRate(int64_t m, int64_t k, int64_t n) {
  at::Tensor a = at::randn({m, k}), b = at::randn({k, n}), c = at::empty({m, n});
  double s = BestSeconds(3, 10, [&] { at::mm_out(c, a, b); });
  return 2.0 * m * k * n / s;
}

// Matmul FLOPs of one forward token: 2 per weight used (attention, the k chosen experts, router,
// lm_head), plus attention scores and values, 4·C·Q·D per layer for C keys seen. Causal attention
// over T tokens sees (T + 1) / 2 keys on average: only the needed work is counted.
double ForwardFlopsPerToken(const ModelConfig& c, int64_t context) {
  const double h = c.hidden_size, qd = c.num_attention_heads * c.head_dim, kvd = c.num_key_value_heads * c.head_dim;
  double per_layer = 2 * (h * qd * 2 + h * kvd * 2);  // q, o, k, v
  per_layer += 2 * c.num_experts_per_tok * 3 * h * c.intermediate_size;
  if (c.is_moe()) per_layer += 2 * c.num_experts * h;
  per_layer += 4.0 * context * qd;
  return c.num_hidden_layers * per_layer + 2 * h * c.vocab_size;
}

nlohmann::json TrainStep(const std::string& name, const ModelConfig& config, int64_t batch, int64_t seq, double gemm) {
  FlexOlmoModel model = *FlexOlmoModel::Create(config, at::kFloat, 1);
  std::vector<at::Tensor> params;
  for (NamedTensor& nt : model.NamedParameters()) params.push_back(nt.tensor.requires_grad_(true));
  at::Tensor ids = at::randint(0, config.vocab_size, {batch, seq + 1}, at::kLong);
  at::Tensor inputs = ids.narrow(1, 0, seq), targets = ids.narrow(1, 1, seq).reshape({-1});
  auto step = [&] {
    at::Tensor logits = model.Forward(inputs);
    at::Tensor loss = at::cross_entropy_loss(logits.view({-1, config.vocab_size}), targets);
    std::vector<at::Tensor> grads = torch::autograd::grad({loss}, params);
  };
  const double s = BestSeconds(1, 5, step);
  const double tokens = static_cast<double>(batch * seq);
  const double flops = 3 * ForwardFlopsPerToken(config, (seq + 1) / 2.0) * tokens;
  return {{"impl", "flexfed"}, {"bench", "train_step"}, {"model", name}, {"tokens", tokens},
          {"seconds", s}, {"tokens_per_s", tokens / s}, {"flops_per_s", flops / s}, {"gemm_flops_per_s", gemm},
          {"gemm_fraction", flops / s / gemm}};
}

nlohmann::json Decode(const std::string& name, const ModelConfig& config, int64_t prompt, int64_t steps) {
  c10::InferenceMode inference;
  FlexOlmoModel model = *FlexOlmoModel::Create(config, at::kFloat, 1);
  at::Tensor ids = at::randint(0, config.vocab_size, {1, prompt}, at::kLong);
  auto run = [&] {
    KvCache cache = model.NewCache(1, prompt + steps);
    at::Tensor logits = model.Forward(ids, {}, &cache);
    at::Tensor next = logits.select(1, prompt - 1).argmax(-1, /*keepdim=*/true);
    auto a = Clock::now();
    for (int64_t i = 0; i < steps; ++i) {
      logits = model.Forward(next, {}, &cache);
      next = logits.select(1, 0).argmax(-1, /*keepdim=*/true);
    }
    return Seconds(a, Clock::now());
  };
  run();  // warm-up
  const double s = std::min({run(), run(), run(), run(), run()});
  return {{"impl", "flexfed"}, {"bench", "decode"}, {"model", name}, {"tokens", steps},
          {"seconds", s}, {"tokens_per_s", steps / s}};
}

}  // namespace
}  // namespace flexfed

int main(int argc, char** argv) {
  CLI::App app{"FlexFed model benchmark (one JSON line per measurement); see bench/README.md"};
  int threads = 2;
  int64_t batch = 4, seq = 512;
  app.add_option("--threads", threads, "Intra-op threads (match the Python side)");
  app.add_option("--batch", batch, "Sequences per training step");
  app.add_option("--seq", seq, "Tokens per sequence (batch × seq tokens per step)");
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(threads);
  using flexfed::ModelConfig;
  struct Case { std::string name, preset; int64_t experts, k; };
  for (const Case& c : {Case{"tiny", "tiny", 1, 1}, Case{"small-4x2", "small", 4, 2}}) {
    ModelConfig config = *ModelConfig::Preset(c.preset, c.experts, c.k);
    const double gemm = flexfed::GemmRate(batch * seq, config.hidden_size, config.intermediate_size);
    std::cout << flexfed::TrainStep(c.name, config, batch, seq, gemm).dump() << std::endl;
  }
  for (const Case& c : {Case{"tiny", "tiny", 1, 1}, Case{"tiny-4x2", "tiny", 4, 2}}) {
    std::cout << flexfed::Decode(c.name, *ModelConfig::Preset(c.preset, c.experts, c.k), 16, 128).dump() << std::endl;
  }
  return 0;
}
