// Owner training-step benchmark, FlexFed side: one optimizer step of the expert-training loop
// (common/training.h, the real Trainer::Step) on the `small` anchor, with tokens/s, MFU against a
// GEMM rate measured in the same process, and peak memory against its parts. One JSON line per
// configuration; bench/run_train_bench.sh runs it beside bench/train_bench.py (plain PyTorch).
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <sys/resource.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <random>

#include "common/file_util.h"
#include "common/router_embedding.h"
#include "common/training.h"
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using namespace flexfed;

namespace {

double PeakRssBytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss * 1024.0;
}

// ~2 MB of word salad: enough windows for any batch here; its content does not matter.
void WriteText(const std::string& path) {
  std::mt19937 rng(1);
  const char* words[] = {"alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "seven", "field"};
  std::string text;
  while (text.size() < 2'000'000) text += std::string(words[rng() % 10]) + (rng() % 12 == 0 ? ".\n" : " ");
  if (!WriteFileAtomically(path, text).ok()) std::abort();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"FlexFed owner training-step benchmark (JSON lines); see bench/README.md"};
  int threads = 2;
  std::string preset = "small";
  app.add_option("--threads", threads, "Intra-op threads (match the Python side)");
  app.add_option("--preset", preset, "Anchor size");
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(threads);

  const fs::path dir = fs::temp_directory_path() / ("flexfed-train-bench-" + std::to_string(getpid()));
  fs::create_directories(dir);
  ModelConfig config = *ModelConfig::Preset(preset);
  {
    FlexOlmoModel anchor = *FlexOlmoModel::Create(config, at::kFloat, 1);
    if (!anchor.Save((dir / "anchor").string()).ok()) return 1;
    RouterEmbedding pub, mine;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      pub.rows.push_back(at::randn({config.hidden_size}));
      mine.rows.push_back(at::randn({config.hidden_size}));
    }
    if (!WriteRouterEmbedding((dir / "anchor/router_pub.safetensors").string(), pub).ok()) return 1;
    if (!WriteRouterEmbedding((dir / "mine.safetensors").string(), mine).ok()) return 1;
    WriteText((dir / "data.txt").string());
  }
  struct Shape { int64_t batch, seq; };
  for (Shape shape : {Shape{4, 512}, Shape{1, 256}}) {
    TrainConfig c;
    c.data = {(dir / "data.txt").string()};
    c.seq_len = shape.seq;
    c.batch_size = shape.batch;
    c.max_steps = 1000;
    c.val_every = 0;
    c.checkpoint_every = 0;
    c.threads = threads;
    c.validation_fraction = 0;
    const std::string run = (dir / ("run" + std::to_string(shape.seq))).string();
    auto trainer = Trainer::Create(c, {(dir / "anchor").string(), (dir / "mine.safetensors").string(), run,
                                       (dir / "cache").string()}, false);
    if (!trainer.ok()) {
      std::cerr << trainer.status().message() << "\n";
      return 1;
    }
    (*trainer)->Step();  // warm-up
    double best = 1e30;
    for (int i = 0; i < (shape.seq >= 512 ? 4 : 12); ++i) {
      auto start = std::chrono::steady_clock::now();
      (*trainer)->Step();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    // FLOPs per token: 6 per trained weight, 4 per frozen weight used (no weight gradient), causal attention.
    double trained = 0, frozen = 0, frozen_bytes = 0, trained_bytes = 0;
    for (const NamedTensor& nt : (*trainer)->trainable()) trained += nt.tensor.numel();
    for (const NamedTensor& nt : (*trainer)->FrozenTensors()) {
      frozen_bytes += nt.tensor.nbytes();
      if (nt.name != "model.embed_tokens.weight") frozen += nt.tensor.numel();
    }
    trained_bytes = trained * 4;
    const double tokens = static_cast<double>(shape.batch * shape.seq);
    const double attention = 12.0 * (shape.seq + 1) / 2.0 * config.hidden_size * config.num_hidden_layers;
    const double flops = (6 * trained + 4 * frozen + attention) * tokens;
    at::Tensor a = at::randn({2048, config.hidden_size}), b = at::randn({config.hidden_size, config.intermediate_size}), out = at::empty({2048, config.intermediate_size});
    double gemm_best = 1e30;
    for (int i = 0; i < 6; ++i) {
      auto start = std::chrono::steady_clock::now();
      at::mm_out(out, a, b);
      gemm_best = std::min(gemm_best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    const double gemm = 2.0 * 2048 * config.hidden_size * config.intermediate_size / gemm_best;
    nlohmann::json j = {{"impl", "flexfed"}, {"tokens_per_step", tokens}, {"seconds", best},
                        {"tokens_per_s", tokens / best}, {"mfu", flops / best / gemm}, {"gemm_flops_per_s", gemm},
                        {"peak_rss_bytes", PeakRssBytes()},
                        {"memory", {{"frozen_weights", frozen_bytes}, {"trained_weights", trained_bytes},
                                    {"trained_grads", trained_bytes}, {"adam_states", 2 * trained_bytes}}}};
    std::cout << j.dump() << std::endl;
  }
  fs::remove_all(dir);
  return 0;
}
