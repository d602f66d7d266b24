// Owner training-step benchmark, FlexFed side: one optimizer step of the expert-training loop
// (common/train/training.h, the real Trainer::Step) on a fresh anchor of --preset, with tokens/s, MFU against
// the GEMM rate the trainer measures on its device, and peak memory against its parts. One JSON line
// per configuration. bench/run_train_bench.sh runs it on the CPU beside bench/train_bench.py (plain
// PyTorch); bench/gpu/run.sh runs it on a GPU with --device cuda --preset 1b. With --dp it times
// DP-SGD's step (per-sequence norms and clipping, noise; docs/PRIVACY.md) against the plain step on
// the same sequences, in the same run, and prints the ratio. With --elementwise it times instead the
// step's fused elementwise ops against the ATen compositions they replace (forward + backward, at
// each shape's [tokens, FFN width]), in the same process.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <CLI/CLI.hpp>
#include <malloc.h>
#include <sys/resource.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/core/processes.h"
#include <torch/cuda.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#if FLEXFED_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "common/model/layers.h"
#include "common/train/adamw.h"
#include "common/model/router_embedding.h"
#include "common/train/training.h"
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using namespace flexfed;

namespace {

double PeakRssBytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss * 1024.0;
}

// Resets the process's resident high-water mark (VmHWM) to its current size; false where the
// kernel does not allow it.
bool ResetPeakRss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  return static_cast<bool>(clear.flush());
}

// Best of `rounds` wall times of fn(), after one warm-up call.
template <typename Fn>
double BestSeconds(int rounds, Fn&& fn) {
  fn();
  double best = 1e30;
  for (int i = 0; i < rounds; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// One line comparing a fused op with the ATen composition it replaces: run(true) and run(false)
// (forward + backward each) alternated in three rounds, best of each; on `device` (a GPU's work
// is waited for inside each timing).
template <typename Run>
nlohmann::json FusedVsAten(const char* op, int64_t tokens, int64_t width, const at::Device& device, Run&& run) {
  auto finished = [&](bool fused) {
    run(fused);
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  double fused = 1e30, aten = 1e30;
  for (int round = 0; round < 3; ++round) {
    fused = std::min(fused, BestSeconds(5, [&] { finished(true); }));
    aten = std::min(aten, BestSeconds(5, [&] { finished(false); }));
  }
  return {{"impl", "elementwise"}, {"device", device.is_cuda() ? "cuda" : "cpu"}, {"op", op}, {"shape", {tokens, width}},
          {"fused_seconds", fused}, {"aten_seconds", aten}, {"speedup", aten / fused}};
}

// silu(gate)·up at [tokens, FFN width]: SiluMul (fused on the CPU in training) against ATen's silu
// and mul under autograd.
nlohmann::json SiluMulLine(int64_t tokens, int64_t width) {
  at::manual_seed(1);
  const at::Tensor a = at::randn({tokens, width}).requires_grad_(), b = at::randn({tokens, width}).requires_grad_();
  const at::Tensor probe = at::randn({tokens, width});
  return FusedVsAten("silu_mul", tokens, width, at::kCPU, [&](bool fused) {
    (fused ? SiluMul(a, b) : at::silu(a) * b).backward(probe);
    a.mutable_grad() = at::Tensor();
    b.mutable_grad() = at::Tensor();
  });
}

// RMSNorm at [tokens, hidden] with a frozen weight (an owner's anchor norm): RmsNorm (fused on the
// CPU in fp32 training; on a GPU ATen's fused RMSNorm, here on a bf16 input as the QK-norms' under
// autocast) against the ATen composition.
nlohmann::json RmsNormLine(int64_t tokens, int64_t width, const at::Device& device) {
  at::manual_seed(2);
  const at::ScalarType type = device.is_cuda() ? at::kBFloat16 : at::kFloat;
  const at::Tensor x = at::randn({tokens, width}).to(device, type).requires_grad_(), w = (1 + at::randn({width})).to(device);
  const at::Tensor probe = at::randn({tokens, width}).to(device, type);
  return FusedVsAten("rms_norm", tokens, width, device, [&](bool fused) {
    (fused ? RmsNorm(x, w, 1e-6) : RmsNormReference(x, w, 1e-6)).backward(probe);
    x.mutable_grad() = at::Tensor();
  });
}

// AdamW's step over the expert's trained matrices (gate, up, down of every layer) with bf16 moments:
// the one pass (AdamW::Step) against the ATen composition it replaces (moments widened, the fp32
// update's eight operations, rounded back). Shape: [layers, elements a layer].
nlohmann::json AdamWLine(const ModelConfig& config, const at::Device& device) {
  at::manual_seed(3);
  const AdamWOptions options{0.9, 0.95, 1e-8, 0.1, at::kBFloat16};
  std::vector<NamedTensor> params;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    for (const char* name : {"gate", "up", "down"}) {
      const bool down = std::string(name) == "down";
      at::Tensor p = at::randn(down ? std::vector<int64_t>{config.hidden_size, config.intermediate_size}
                                    : std::vector<int64_t>{config.intermediate_size, config.hidden_size})
                         .to(device)
                         .requires_grad_();
      p.mutable_grad() = 0.01 * at::randn_like(p);
      params.push_back({absl::StrCat(l, ".", name), p});
    }
  }
  AdamW opt(params, options);
  return FusedVsAten("adamw_bf16_moments", config.num_hidden_layers, 3 * config.intermediate_size * config.hidden_size,
                     device, [&](bool fused) {
                       if (fused) {
                         opt.Step(1e-4);
                         return;
                       }
                       c10::NoGradGuard no_grad;
                       for (size_t i = 0; i < params.size(); ++i) {
                         at::Tensor p = params[i].tensor, m = opt.exp_avg(i).to(at::kFloat), v = opt.exp_avg_sq(i).to(at::kFloat);
                         AdamWUpdate(p, p.grad(), m, v, 1e-4, options, 1);
                         opt.exp_avg(i).copy_(m);
                         opt.exp_avg_sq(i).copy_(v);
                       }
                     });
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
  std::string preset = "small", device = "cpu", precision = "auto";
  std::vector<std::string> shapes = {"4x512", "1x256"};
  bool dp = false, checkpointing = false, measure_memory = false;
  std::string moments = "fp32";
  int64_t layers = 0;
  std::string profile;
  app.add_option("--threads", threads, "Intra-op threads (match the Python side)");
  app.add_option("--preset", preset, "Anchor size");
  app.add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", precision, "auto, fp32 or bf16 (autocast)")->check(CLI::IsMember({"auto", "fp32", "bf16"}));
  app.add_option("--shape", shapes, "Micro-batch shapes BATCHxSEQ, one line each");
  app.add_option("--layers", layers, "Override the preset's layer count (a 7b-shaped model with fewer layers)");
  app.add_option("--profile", profile,
                 "Also record two more steps of each shape with LibTorch's Kineto profiler (on a GPU its kernels too): a Chrome trace FILE.SHAPE.json "
                 "(bench/profile_ops.py sums it per operation)");
  app.add_flag("--activation-checkpointing", checkpointing, "Recompute each layer in the backward (train --activation-checkpointing)");
  app.add_option("--optimizer-moments", moments, "fp32 or bf16 AdamW moments")->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_flag("--measure-memory", measure_memory,
               "CPU: measure what one step adds at its peak, to the resident size (step_peak_growth_bytes) and in tensors "
               "(step_peak_tensor_bytes), against the plan's planned_step_bytes; large allocations then go straight to the "
               "system, which slows the step");
  bool elementwise = false;
  app.add_flag("--elementwise", elementwise,
               "Time only the fused elementwise ops against the ATen compositions they replace (on --device), one line per shape "
               "and one for AdamW with bf16 moments over the expert's matrices");
  app.add_flag("--dp", dp, "Also time the DP-SGD step (clip 1, noise 1) on the same sequences; print the cost ratio");
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(threads);
  if (measure_memory) {
    // Every allocation of 1 MiB or more straight from the system and back when freed (a fixed
    // threshold also stops glibc from raising it): the resident size then follows the live
    // tensors, so a step's peak is measured rather than the heap's high-water mark. It costs time
    // (fresh pages for every large tensor): tokens/s from such a run are not comparable.
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
  }

  // The arguments, checked before anything is built.
  struct Shape { int64_t batch, seq; std::string text; };
  std::vector<Shape> parsed;
  for (const std::string& text : shapes) {
    Shape shape{0, 0, text};
    if (std::sscanf(text.c_str(), "%ldx%ld", &shape.batch, &shape.seq) != 2 || shape.batch < 1 || shape.seq < 2) {
      std::cerr << "--shape " << text << ": expected BATCHxSEQ, e.g. 4x2048\n";
      return 2;
    }
    parsed.push_back(shape);
  }
  absl::StatusOr<ModelConfig> preset_config = ModelConfig::Preset(preset);
  if (!preset_config.ok()) {
    std::cerr << "--preset: " << preset_config.status().message() << "\n";
    return 2;
  }
  ModelConfig config = *preset_config;
  if (layers > 0) config.num_hidden_layers = layers;

  if (elementwise) {
    KeepFreedMemoryForReuse();  // as in training on the CPU
    const at::Device on = device == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
    for (const Shape& shape : parsed) {
      // silu·up has no fused training pass on a GPU (the dispatch path's SwiGLU kernel is kernel_bench's).
      if (!on.is_cuda()) std::cout << SiluMulLine(shape.batch * shape.seq, config.intermediate_size).dump() << std::endl;
      std::cout << RmsNormLine(shape.batch * shape.seq, config.hidden_size, on).dump() << std::endl;
    }
    std::cout << AdamWLine(config, on).dump() << std::endl;
    return 0;
  }
  const fs::path dir = fs::temp_directory_path() / ("flexfed-train-bench-" + std::to_string(getpid()));
  fs::create_directories(dir);
  {
    // bf16 halves the 1b anchor on disk; the trainer loads fp32 master weights either way.
    FlexOlmoModel anchor = *FlexOlmoModel::Create(config, config.vocab_size > 1000 ? at::kBFloat16 : at::kFloat, 1);
    if (!anchor.Save((dir / "anchor").string()).ok()) return 1;
    // Byte-level text through a larger vocabulary: the compute is the model's all the same.
    if (!WriteFileAtomically((dir / "anchor/flexfed_tokenizer.json").string(), "{\"type\": \"bytes\"}\n").ok()) return 1;
    RouterEmbedding pub, mine;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      pub.rows.push_back(at::randn({config.hidden_size}));
      mine.rows.push_back(at::randn({config.hidden_size}));
    }
    if (!WriteRouterEmbedding((dir / "anchor/router_pub.safetensors").string(), pub).ok()) return 1;
    if (!WriteRouterEmbedding((dir / "mine.safetensors").string(), mine).ok()) return 1;
    WriteText((dir / "data.txt").string());
  }
  for (const Shape& shape : parsed) {
    const std::string& text = shape.text;
    TrainConfig c;
    c.data = {(dir / "data.txt").string()};
    c.seq_len = shape.seq;
    c.batch_size = shape.batch;
    c.max_steps = 1000;
    c.val_every = 0;
    c.checkpoint_every = 0;
    c.threads = threads;
    c.device = device;
    c.precision = precision;
    c.activation_checkpointing = checkpointing;
    c.optimizer_moments = moments;
    c.validation_fraction = 0;
    double plain_seconds = 0, plain_rss = 0;
    for (const bool private_step : dp ? std::vector<bool>{false, true} : std::vector<bool>{false}) {
      TrainConfig cc = c;
      if (private_step) {
        cc.dp_max_grad_norm = 1.0;
        cc.dp_noise_multiplier = 1.0;
      }
      const std::string run = (dir / ("run" + std::to_string(shape.seq) + (private_step ? "dp" : ""))).string();
      auto trainer = Trainer::Create(cc, {(dir / "anchor").string(), (dir / "mine.safetensors").string(), run,
                                          (dir / "cache").string()}, false);
      if (!trainer.ok()) {
        std::cerr << trainer.status().message() << "\n";
        return 1;
      }
      const bool cuda = (*trainer)->device().is_cuda();
      // As `flexfed-owner train` does on the CPU (a step's peak is measured with the opposite setting).
      if (!cuda && !measure_memory) KeepFreedMemoryForReuse();
#if FLEXFED_WITH_CUDA
      if (cuda) c10::cuda::CUDACachingAllocator::resetPeakStats((*trainer)->device().index());
#endif
      // The same sequences for the plain and the private step (a Poisson batch varies in size).
      std::vector<int64_t> ids(shape.batch);
      for (int64_t i = 0; i < shape.batch; ++i) ids[i] = i;
      auto step = [&] {  // one optimizer step, finished on the device
        (*trainer)->StepOn(ids);
        if (cuda) torch::cuda::synchronize();
      };
      const double best = BestSeconds(shape.seq >= 512 ? 4 : 12, step);  // after a warm-up step
      // What one step adds to the resident memory at its peak (gradients, activations, the loss's
      // block and every temporary) on the CPU, against the plan's parts for them.
      double step_growth = -1, step_tensors = -1;
      if (measure_memory && !cuda && ResetPeakRss()) {
        malloc_trim(0);  // freed heap memory back to the system first: the growth is the step's own
        ResetPeakRss();
        const double before = static_cast<double>(ProcessStatusBytes("VmRSS"));
        step();
        step_growth = static_cast<double>(ProcessStatusBytes("VmHWM")) - before;
        // The same step at the tensors' level: what LibTorch's allocator handed out at the peak.
        const TensorMemoryMeter meter;
        step();
        step_tensors = static_cast<double>(meter.peak_bytes());
      }
      if (!profile.empty() && !private_step) {
        // LibTorch's Kineto profiler: the operations on the CPU and, on a GPU, every kernel with its
        // time on the device (bench/profile_ops.py sums both).
        namespace prof = torch::profiler::impl;
        const prof::ProfilerConfig config(prof::ProfilerState::KINETO);
        std::set<prof::ActivityType> activities = {prof::ActivityType::CPU};
        if (cuda) activities.insert(prof::ActivityType::CUDA);
        torch::autograd::profiler::prepareProfiler(config, activities);
        torch::autograd::profiler::enableProfiler(config, activities);
        step();
        step();
        torch::autograd::profiler::disableProfiler()->save(profile + "." + text + ".json");
      }
      double frozen_bytes = 0, trained_bytes = 0;
      for (const NamedTensor& nt : (*trainer)->trainable()) trained_bytes += nt.tensor.nbytes();
      for (const NamedTensor& nt : (*trainer)->FrozenTensors()) frozen_bytes += nt.tensor.nbytes();
      const double tokens = static_cast<double>(shape.batch * shape.seq);
      const double gemm = (*trainer)->gemm_rate();
      nlohmann::json j = {{"impl", "flexfed"}, {"device", cuda ? "cuda" : "cpu"}, {"preset", preset}, {"dp", private_step},
                          {"batch", shape.batch}, {"seq_len", shape.seq}, {"tokens_per_step", tokens}, {"seconds", best}, {"tokens_per_s", tokens / best},
                          {"mfu", (*trainer)->flops_per_token() * tokens / best / gemm}, {"gemm_flops_per_s", gemm},
                          {"peak_rss_bytes", PeakRssBytes()},
                          {"memory", {{"frozen_weights", frozen_bytes}, {"trained_weights", trained_bytes},
                                      {"trained_grads", trained_bytes},
                                      {"adam_states", 2 * trained_bytes / (moments == "bf16" ? 2 : 1)}}}};
      if (absl::StatusOr<MemoryPlan> plan = PlanRunMemory(cc, {(dir / "anchor").string(), "", run, ""}, 1); plan.ok()) {
        j["planned_bytes"] = plan->total();  // the memory plan, to compare with the measured peak
        double per_step = 0;
        for (const MemoryPlanPart& part : plan->parts) {
          if (part.name == "gradients" || part.name == "activations" || part.name == "loss" || part.name == "autocast copies") {
            per_step += static_cast<double>(part.bytes);
          }
        }
        j["planned_step_bytes"] = per_step;
        if (step_growth >= 0) j["step_peak_growth_bytes"] = step_growth;
        if (step_tensors >= 0) j["step_peak_tensor_bytes"] = step_tensors;
      }
#if FLEXFED_WITH_CUDA
      if (cuda) {
        const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats((*trainer)->device().index());
        j["peak_device_bytes"] = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
        // What the caching allocator held from the device at its peak: the plan is compared with the
        // allocated peak, and the difference is the headroom a run needs beyond its plan.
        j["peak_reserved_bytes"] = stats.reserved_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
      }
#endif
      j["layers"] = config.num_hidden_layers;
      j["activation_checkpointing"] = checkpointing;
      j["optimizer_moments"] = moments;
      if (private_step) {
        // Peak RSS only grows in a process: the private step's extra memory shows as the growth.
        j["dp_time_ratio"] = best / plain_seconds;
        j["dp_peak_rss_growth_bytes"] = PeakRssBytes() - plain_rss;
      } else {
        plain_seconds = best;
        plain_rss = PeakRssBytes();
      }
      std::cout << j.dump() << std::endl;
    }
  }
  fs::remove_all(dir);
  return 0;
}
