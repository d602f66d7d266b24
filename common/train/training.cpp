#include "common/train/training.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#if FLEXFED_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/model/anchor.h"
#include "common/model/autocast.h"
#include "common/merge/merge.h"
#include "common/merge/router_tuning.h"
#include "common/model/hf_tokenizer.h"
#include "common/core/file_util.h"
#include "common/core/processes.h"
#include "common/model/moe_dispatch.h"
#include "common/model/router_embedding.h"
#include "common/train/cross_entropy.h"
#include "common/core/dp_accountant.h"
#include "common/core/expert_module.h"
#include "common/train/dp_sgd.h"

namespace flexfed {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr char kConfigFile[] = "train_config.json";
constexpr char kMetricsFile[] = "metrics.jsonl";
constexpr double kPi = 3.14159265358979323846;

absl::Status Bad(const std::string& what) { return absl::InvalidArgumentError(what); }

// GEMM FLOP/s on [m, k] × [k, n] in `dtype` on `device`, measured (best of 4 samples after a warm-up;
// the current threads on the CPU). A GPU sample ends with a host read, which waits for the products.
// It is the rate MFU is measured against: the step's dominant product [m, k] × [k, n] in each of the
// three operand layouts a training step uses — forward y = x·Wᵀ, input gradient dx = dy·W, weight
// gradient dW = dyᵀ·x — and the best of them. BLAS libraries differ by layout (MKL on an AVX2
// machine: 73 GFLOP/s for the plain product, 95 for x·Wᵀ at [2048, 512] × [512, 1376]), and a
// denominator taken from the slow one put MFU above 100%.
double MeasureGemmRate(int64_t m, int64_t k, int64_t n, at::Device device, at::ScalarType dtype) {
  const at::TensorOptions o = at::TensorOptions().device(device).dtype(dtype);
  const at::Tensor x = at::randn({m, k}, o), w = at::randn({n, k}, o), dy = at::randn({m, n}, o);
  const std::function<at::Tensor()> layouts[] = {[&] { return at::linear(x, w); },    // [m, n]
                                                 [&] { return at::mm(dy, w); },       // [m, k]
                                                 [&] { return at::mm(dy.t(), x); }};  // [n, k]
  // Each sample repeats the product for at least ~20 ms: small products (256 rows take ~2 ms on a
  // 2-core CPU) timed one at a time give a denominator as noisy as the machine.
  double best = 1e30;
  for (const auto& product : layouts) {
    const auto time = [&](int reps) {
      auto start = Clock::now();
      at::Tensor out;
      for (int r = 0; r < reps; ++r) out = product();
      if (device.is_cuda()) out[0][0].item<float>();
      return std::chrono::duration<double>(Clock::now() - start).count() / reps;
    };
    const double first = time(1);  // warms up
    const int reps = std::clamp(static_cast<int>(0.02 / std::max(first, 1e-6)), device.is_cuda() ? 10 : 2, 1000);
    for (int i = 0; i < 4; ++i) best = std::min(best, time(reps));
  }
  return 2.0 * m * k * n / best;
}

// "auto" | "cpu" | "cuda" → the device training runs on.
absl::StatusOr<at::Device> TrainingDevice(const std::string& device) {
  if (device == "cpu") return at::Device(at::kCPU);
  if (at::hasCUDA()) return at::Device(at::kCUDA, 0);
  if (device == "auto") return at::Device(at::kCPU);
  if (!CudaKernelsBuilt()) {
    return absl::FailedPreconditionError(
        "--device cuda: no CUDA device is available to this build; build FlexFed against a CUDA LibTorch with "
        "-DFLEXFED_CUDA=ON (docs/GPU.md) on a machine whose GPU nvidia-smi shows, or train with --device cpu");
  }
  return absl::FailedPreconditionError(
      "--device cuda: no CUDA device is visible; check nvidia-smi and CUDA_VISIBLE_DEVICES, or train with --device cpu");
}

}  // namespace

namespace {

// What PlanRunMemory plans from: the model's shape and the plan's settings for `config`.
absl::StatusOr<std::pair<ModelConfig, MemoryPlanSettings>> RunMemorySettings(const TrainConfig& config,
                                                                           const TrainInputs& inputs, int world_size) {
  absl::StatusOr<ModelConfig> model = config.mode == "pretrain" ? ModelConfig::Preset(config.preset)
                                                                : ReadModelConfig((fs::path(inputs.anchor_dir) / "config.json").string());
  if (!model.ok()) return model.status();
  if (config.mode == "pretrain" && !config.tokenizer.empty()) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> hf = LoadHfTokenizer(config.tokenizer);
    if (!hf.ok()) return hf.status();
    model->vocab_size = ((*hf)->vocab_size() + 63) / 64 * 64;
  }
  absl::StatusOr<at::Device> device = TrainingDevice(config.device);
  if (!device.ok()) return device.status();
  MemoryPlanSettings s;
  s.mode = config.mode;
  s.experts = config.mode == "router" ? static_cast<int64_t>(inputs.modules.size()) + 1 : 2;  // + the public expert
  s.micro_batch = config.batch_size;
  s.seq_len = config.seq_len;
  s.bf16_autocast = config.precision == "bf16" || (config.precision == "auto" && device->is_cuda());
  s.world_size = world_size;
  s.activation_checkpointing = config.activation_checkpointing;
  s.bf16_moments = config.optimizer_moments == "bf16";
  s.fused_silu = device->is_cpu() && !s.bf16_autocast;  // SiluMul's fused training pass (common/model/layers.h)
  // The expert's MoE block through the dispatch ops (a GPU's); DP-SGD's per-sequence norms record the
  // LibTorch path's activations instead (FlexOlmoModel::Moe).
  s.dispatch_moe = (config.mode == "expert" || config.mode == "router") && !config.dp() && UseDispatchMoe(*device);
  s.top_k = config.top_k;
  // Frozen matrices and embeddings are kept in bf16 when their values are (a bf16 checkpoint).
  const bool owner = config.mode == "expert" || config.mode == "dense";
  s.bf16_frozen = s.bf16_embeddings = s.bf16_autocast && owner && model->torch_dtype == "bfloat16";
  return std::pair<ModelConfig, MemoryPlanSettings>(*std::move(model), s);
}

}  // namespace

absl::StatusOr<MemoryPlan> PlanRunMemory(const TrainConfig& config, const TrainInputs& inputs, int world_size) {
  absl::StatusOr<std::pair<ModelConfig, MemoryPlanSettings>> run = RunMemorySettings(config, inputs, world_size);
  if (!run.ok()) return run.status();
  return PlanTrainingMemory(run->first, run->second);
}

absl::StatusOr<MemoryFits> FittingSettings(const TrainConfig& config, const TrainInputs& inputs, int world_size,
                                           int64_t capacity) {
  absl::StatusOr<std::pair<ModelConfig, MemoryPlanSettings>> run = RunMemorySettings(config, inputs, world_size);
  if (!run.ok()) return run.status();
  const ModelConfig& model = run->first;
  struct Candidate {
    bool checkpointing, bf16_moments;
    int64_t batch;
    int64_t bytes;
  };
  std::vector<Candidate> found;
  MemoryFits out;
  out.smallest.total_bytes = std::numeric_limits<int64_t>::max();
  // The micro-batches that divide --batch-size: the step's sequences and the validation's stay the same.
  std::vector<int64_t> batches;
  for (int64_t b = config.batch_size; b >= 1; --b) {
    if (config.batch_size % b == 0) batches.push_back(b);
  }
  auto fit = [&](bool checkpointing, bool bf16_moments, int64_t batch, int64_t bytes) {
    MemoryFit f{"", config, bytes};
    std::vector<std::string> a;
    if (batch != config.batch_size) {
      const int64_t times = config.batch_size / batch;
      f.config.batch_size = batch;
      f.config.grad_accum *= times;
      f.config.val_batches *= times;
      a.push_back(absl::StrCat("--batch-size ", batch, " --grad-accum ", f.config.grad_accum));
      if (config.val_batches > 0) a.push_back(absl::StrCat("--val-batches ", f.config.val_batches));
    }
    if (checkpointing != config.activation_checkpointing) a.push_back("--activation-checkpointing");
    if (bf16_moments != (config.optimizer_moments == "bf16")) a.push_back("--optimizer-moments bf16");
    f.config.activation_checkpointing = checkpointing;
    if (bf16_moments) f.config.optimizer_moments = "bf16";
    f.args = absl::StrJoin(a, " ");
    return f;
  };
  if (PlanTrainingMemory(model, run->second).total() <= capacity) return out;  // it fits as it is
  // Checkpointing is not for DP-SGD (its per-sequence norms need every layer's activations); bf16
  // moments need beta2 ≤ 0.99 (TrainConfig::Validate).
  std::vector<bool> checkpointing_options = {config.activation_checkpointing};
  if (!config.activation_checkpointing && !config.dp()) checkpointing_options.push_back(true);
  std::vector<bool> moments_options = {config.optimizer_moments == "bf16"};
  if (config.optimizer_moments != "bf16" && config.beta2 <= 0.99) moments_options.push_back(true);
  for (const bool checkpointing : checkpointing_options) {
    for (const bool bf16_moments : moments_options) {
      for (const int64_t batch : batches) {
        MemoryPlanSettings s = run->second;
        s.activation_checkpointing = checkpointing;
        s.bf16_moments = bf16_moments;
        s.micro_batch = batch;
        const int64_t bytes = PlanTrainingMemory(model, s).total();
        if (bytes < out.smallest.total_bytes) out.smallest = fit(checkpointing, bf16_moments, batch, bytes);
        if (bytes <= capacity) {
          found.push_back({checkpointing, bf16_moments, batch, bytes});
          break;  // the largest micro-batch that fits with these settings
        }
      }
    }
  }
  // `found` runs from fewer changes to more (the loops' order). A combination is left out when one
  // with a subset of its changes fits an equal or larger micro-batch.
  auto subset = [](const Candidate& a, const Candidate& b) {  // a's changes are a strict subset of b's
    return (a.checkpointing <= b.checkpointing && a.bf16_moments <= b.bf16_moments) &&
           (a.checkpointing != b.checkpointing || a.bf16_moments != b.bf16_moments);
  };
  for (const Candidate& c : found) {
    const bool dominated = std::any_of(found.begin(), found.end(), [&](const Candidate& other) {
      return subset(other, c) && other.batch >= c.batch;
    });
    if (!dominated) out.fits.push_back(fit(c.checkpointing, c.bf16_moments, c.batch, c.bytes));
  }
  return out;
}

namespace {
// {free, total} bytes of the GPU this process trains on (a data-parallel worker's is cuda:local_rank),
// made current; nullopt when `config` trains on the CPU.
absl::StatusOr<std::optional<std::pair<int64_t, int64_t>>> TrainingGpuMemory(const TrainConfig& config, int local_rank) {
  absl::StatusOr<at::Device> device = TrainingDevice(config.device);
  if (!device.ok()) return device.status();
  if (!device->is_cuda()) return std::nullopt;
#if FLEXFED_WITH_CUDA
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaSetDevice(local_rank) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
    return std::pair<int64_t, int64_t>(static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes));
  }
#endif
  return absl::FailedPreconditionError(absl::StrCat("cannot read the free memory of cuda:", local_rank,
                                                    "; check nvidia-smi and CUDA_VISIBLE_DEVICES"));
}
}  // namespace

absl::Status LimitDeviceMemory(const TrainConfig& config, int local_rank, int64_t bytes) {
  absl::StatusOr<std::optional<std::pair<int64_t, int64_t>>> gpu = TrainingGpuMemory(config, local_rank);
  if (!gpu.ok()) return gpu.status();
#if FLEXFED_WITH_CUDA
  if (gpu->has_value()) {
    c10::cuda::CUDACachingAllocator::setMemoryFraction(
        std::min(1.0, static_cast<double>(bytes) / static_cast<double>((*gpu)->second)),
        static_cast<c10::DeviceIndex>(local_rank));
  }
#else
  (void)bytes;
#endif
  return absl::OkStatus();
}

absl::StatusOr<std::pair<int64_t, std::string>> TrainingMemoryCapacity(const TrainConfig& config, int processes,
                                                                       int local_rank) {
  absl::StatusOr<std::optional<std::pair<int64_t, int64_t>>> gpu = TrainingGpuMemory(config, local_rank);
  if (!gpu.ok()) return gpu.status();
  if (gpu->has_value()) return std::pair<int64_t, std::string>((*gpu)->first, absl::StrCat("cuda:", local_rank, " (free memory)"));
  std::ifstream meminfo("/proc/meminfo");
  for (std::string line; std::getline(meminfo, line);) {
    int64_t kib = 0;
    if (line.rfind("MemAvailable:", 0) == 0 && absl::SimpleAtoi(absl::StripAsciiWhitespace(absl::StripSuffix(line.substr(13), "kB")), &kib)) {
      return std::pair<int64_t, std::string>(kib * 1024 / std::max(1, processes),
                                             processes > 1 ? absl::StrCat("this machine's available memory ÷ ", processes, " processes")
                                                           : std::string("this machine's available memory"));
    }
  }
  return absl::UnavailableError("cannot read MemAvailable from /proc/meminfo");
}

namespace {

absl::StatusOr<json> ReadJsonFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(absl::StrCat(path, ": not valid JSON"));
  return j;
}

std::string CheckpointName(int64_t step) { return absl::StrFormat("step-%08d", step); }

// Router [2, H] = [r_pub (frozen); r_i (trained)] and bias [0, b_i] per layer. Rebuilt before
// every forward, so gradients reach the trained leaves r_i and b_i.
void ComposeRouters(const std::vector<at::Tensor>& pub, const std::vector<at::Tensor>& rows,
                    const std::vector<at::Tensor>& bias, std::vector<LayerWeights>& layers) {
  for (size_t l = 0; l < layers.size(); ++l) {
    layers[l].router = at::cat({pub[l], rows[l].view({1, -1})});
    if (!bias.empty()) layers[l].router_bias = at::cat({at::zeros({1}, bias[l].options()), bias[l]});
  }
}

}  // namespace

// ------------------------------------------------------------------------------------ config

absl::Status TrainConfig::Validate() const {
  if (mode != "expert" && mode != "dense" && mode != "pretrain" && mode != "router") {
    return Bad(absl::StrCat("mode '", mode, "' is not expert, dense, pretrain or router"));
  }
  if (data.empty()) return Bad("no training data; pass --data FILE_OR_FOLDER");
  if (seq_len < 2 || batch_size < 1 || grad_accum < 1) return Bad("seq_len must be ≥ 2, batch_size and grad_accum ≥ 1");
  if (max_steps <= 0 && token_budget <= 0) return Bad("give a step count (--steps) or a token budget (--tokens)");
  if (max_steps < 0 || token_budget < 0) return Bad("--steps and --tokens must not be negative");
  if (!(lr > 0) || min_lr_ratio < 0 || min_lr_ratio > 1) return Bad("lr must be positive and min_lr_ratio in [0, 1]");
  if (warmup_steps < 0) return Bad("warmup_steps must not be negative");
  if (!(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1 && eps > 0 && weight_decay >= 0)) {
    return Bad("AdamW needs 0 ≤ beta1, beta2 < 1, eps > 0 and weight_decay ≥ 0");
  }
  if (grad_clip < 0 || z_loss < 0) return Bad("grad_clip and z_loss must not be negative");
  if (mode == "router" ? top_k < 0 : (top_k < 1 || top_k > 2)) {
    return Bad(mode == "router" ? "top_k must be ≥ 0 (0 = every expert)" : "top_k must be 1 or 2 (the two-expert model)");
  }
  if (validation_fraction < 0 || validation_fraction >= 1) return Bad("validation_fraction must be in [0, 1)");
  if (val_every < 0 || val_batches < 0 || checkpoint_every < 0 || log_every < 1 || keep_checkpoints < 1) {
    return Bad("val_every, val_batches, checkpoint_every must be ≥ 0, log_every and keep_checkpoints ≥ 1");
  }
  if (device != "auto" && device != "cpu" && device != "cuda") return Bad("device must be auto, cpu or cuda");
  if (!tokenizer.empty() && mode != "pretrain") {
    return Bad("--tokenizer is for --pretrain only; experts use the anchor's tokenizer");
  }
  if (precision != "auto" && precision != "fp32" && precision != "bf16") return Bad("precision must be auto, fp32 or bf16");
  if (optimizer_moments != "fp32" && optimizer_moments != "bf16") return Bad("optimizer_moments must be fp32 or bf16");
  if (optimizer_moments == "bf16" && beta2 > 0.99) {
    // bf16 resolves 2⁻⁸ of a value: with 1 − β2 below ~1% most updates of v would round away.
    return Bad("--optimizer-moments bf16 needs beta2 ≤ 0.99 (bf16 cannot hold smaller updates of the second moment); "
               "use fp32 moments or a lower beta2");
  }
  if (activation_checkpointing && dp_max_grad_norm > 0) {
    return Bad("--activation-checkpointing does not combine with DP-SGD (its per-sequence norms need every layer's "
               "activations); drop one, or lower --batch-size to fit");
  }
  if (dp_max_grad_norm < 0) return Bad("--dp-max-grad-norm must not be negative (0 = no differential privacy)");
  if (!dp()) {
    if (dp_noise_multiplier >= 0 || dp_epsilon > 0) {
      return Bad("--dp-noise-multiplier and --dp-epsilon need --dp-max-grad-norm C, the per-sequence clipping norm");
    }
  } else {
    if (mode != "expert" && mode != "dense") return Bad("differential privacy (--dp-*) is for training an owner's expert (or --dense)");
    if ((dp_noise_multiplier >= 0) == (dp_epsilon > 0)) {
      return Bad("with --dp-max-grad-norm give either --dp-noise-multiplier σ or --dp-epsilon ε (with --dp-delta), not both");
    }
    if (!(dp_delta > 0 && dp_delta <= kMaxDpDelta)) {
      return Bad(absl::StrCat("--dp-delta must be in (0, ", kMaxDpDelta, "], e.g. 1e-5 (below 1 / the number of sequences); ",
                              "coordinators refuse a module whose record has a larger delta"));
    }
  }
  return absl::OkStatus();
}

json DpAccount::ToJson() const {
  return {{"mechanism", "DP-SGD: per-sequence clipping, Gaussian noise, Poisson sampling"},
          {"unit", absl::StrCat("one training sequence of ", sequence_tokens, " tokens")},
          {"noise_multiplier", noise_multiplier}, {"max_grad_norm", max_grad_norm},
          {"sampling", "poisson"}, {"sampling_rate", sampling_rate}, {"expected_batch", expected_batch},
          {"steps", steps}, {"delta", delta}, {"epsilon", epsilon},
          {"accountant", "RDP of the sampled Gaussian mechanism, (epsilon, delta) by Balle et al. 2020"}};
}

json TrainConfig::IdentityJson() const {
  return {{"mode", mode}, {"data", data}, {"text_field", text_field}, {"validation_fraction", validation_fraction},
          {"seq_len", seq_len}, {"batch_size", batch_size}, {"grad_accum", grad_accum}, {"max_steps", max_steps},
          {"token_budget", token_budget}, {"lr", lr}, {"min_lr_ratio", min_lr_ratio}, {"warmup_steps", warmup_steps},
          {"beta1", beta1}, {"beta2", beta2}, {"eps", eps}, {"weight_decay", weight_decay}, {"grad_clip", grad_clip},
          {"z_loss", z_loss}, {"router_bias", router_bias}, {"top_k", top_k}, {"seed", seed}, {"preset", preset}, {"tokenizer", tokenizer},
          {"dp_max_grad_norm", dp_max_grad_norm}, {"dp_noise_multiplier", dp_noise_multiplier}, {"dp_epsilon", dp_epsilon},
          {"dp_delta", dp_delta}, {"optimizer_moments", optimizer_moments}};
}

json TrainConfig::ToJson() const {
  json j = IdentityJson();
  j.update({{"val_every", val_every}, {"val_batches", val_batches}, {"checkpoint_every", checkpoint_every},
            {"keep_checkpoints", keep_checkpoints}, {"log_every", log_every}, {"device", device}, {"precision", precision}, {"threads", threads},
            {"activation_checkpointing", activation_checkpointing}});
  return j;
}

absl::StatusOr<TrainConfig> TrainConfig::FromJson(const json& j, const std::string& source) {
  if (!j.is_object()) return Bad(absl::StrCat(source, ": expected a JSON object of training settings"));
  TrainConfig c;
  const json known = c.ToJson();
  for (const auto& [key, value] : j.items()) {
    if (!known.contains(key)) {
      return Bad(absl::StrCat(source, ": unknown setting '", key, "' (see flexfed-owner train --help)"));
    }
    const json& like = known[key];
    const bool ok = (like.is_number_integer() && value.is_number_integer()) ||
                    (like.is_number_float() && value.is_number()) || (like.is_boolean() && value.is_boolean()) ||
                    (like.is_string() && value.is_string()) ||
                    (like.is_array() && value.is_array() && std::all_of(value.begin(), value.end(), [](const json& v) { return v.is_string(); }));
    if (!ok) return Bad(absl::StrCat(source, ": setting '", key, "' should be like ", like.dump()));
  }
  auto get = [&](const char* key, auto& field) {
    if (j.contains(key)) field = j[key].get<std::decay_t<decltype(field)>>();
  };
  get("mode", c.mode); get("data", c.data); get("text_field", c.text_field);
  get("validation_fraction", c.validation_fraction); get("seq_len", c.seq_len); get("batch_size", c.batch_size);
  get("grad_accum", c.grad_accum); get("max_steps", c.max_steps); get("token_budget", c.token_budget);
  get("lr", c.lr); get("min_lr_ratio", c.min_lr_ratio); get("warmup_steps", c.warmup_steps);
  get("beta1", c.beta1); get("beta2", c.beta2); get("eps", c.eps); get("weight_decay", c.weight_decay);
  get("grad_clip", c.grad_clip); get("z_loss", c.z_loss); get("router_bias", c.router_bias); get("top_k", c.top_k);
  get("val_every", c.val_every); get("val_batches", c.val_batches); get("checkpoint_every", c.checkpoint_every);
  get("keep_checkpoints", c.keep_checkpoints); get("log_every", c.log_every); get("seed", c.seed);
  get("device", c.device); get("precision", c.precision); get("threads", c.threads); get("preset", c.preset);
  get("tokenizer", c.tokenizer);
  get("dp_max_grad_norm", c.dp_max_grad_norm); get("dp_noise_multiplier", c.dp_noise_multiplier);
  get("dp_epsilon", c.dp_epsilon); get("dp_delta", c.dp_delta);
  get("optimizer_moments", c.optimizer_moments); get("activation_checkpointing", c.activation_checkpointing);
  if (absl::Status s = c.Validate(); !s.ok()) return Bad(absl::StrCat(source, ": ", s.message()));
  return c;
}

// ------------------------------------------------------------------------------------ setup

absl::StatusOr<std::string> LatestCheckpoint(const std::string& run_dir) {
  const fs::path latest = fs::path(run_dir) / "checkpoints" / "latest";
  absl::StatusOr<std::string> name = ReadFile(latest.string());
  if (!name.ok()) return absl::NotFoundError(absl::StrCat(run_dir, ": no checkpoint to resume from"));
  const fs::path dir = fs::path(run_dir) / "checkpoints" / *name;
  if (!fs::is_directory(dir)) {
    return absl::DataLossError(absl::StrCat(latest.string(), " names ", *name, ", which is missing; the run folder is damaged"));
  }
  return dir.string();
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const TrainConfig& config, const TrainInputs& inputs,
                                                         bool resume, DataParallelGroup* group) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  std::unique_ptr<Trainer> t(new Trainer());
  t->config_ = config;
  t->inputs_ = inputs;
  t->group_ = group;
  SetCpuThreads(config.threads);
  absl::StatusOr<at::Device> device = TrainingDevice(config.device);
  if (!device.ok()) return device.status();
  t->device_ = *device;
  if (group != nullptr && device->is_cuda()) t->device_ = at::Device(at::kCUDA, static_cast<at::DeviceIndex>(group->settings().local_rank));
  // Master weights, gradients and optimizer state stay fp32; bf16 is autocast's (the forward's products).
  if (config.precision == "bf16" || (config.precision == "auto" && device->is_cuda())) t->autocast_ = at::kBFloat16;

  // Run folder: a new run must not overwrite another; a resumed one must be the same run.
  const fs::path run = inputs.run_dir;
  const fs::path config_path = run / kConfigFile;
  std::error_code ec;
  if (resume) {
    absl::StatusOr<json> saved = ReadJsonFile(config_path.string());
    if (!saved.ok()) return absl::NotFoundError(absl::StrCat(inputs.run_dir, ": no run to resume (", kConfigFile, " missing)"));
    const json want = config.IdentityJson();
    // A setting newer than the run (e.g. `tokenizer`) had its default value then.
    const json defaults = TrainConfig{}.IdentityJson();
    for (const auto& [key, value] : want.items()) {
      const bool known = saved->contains("settings") && (*saved)["settings"].contains(key);
      const json& was = known ? (*saved)["settings"][key] : defaults[key];
      if (!saved->contains("settings") || was != value) {
        return absl::FailedPreconditionError(absl::StrCat(
            inputs.run_dir, ": was started with a different '", key, "' (", saved->contains("settings") ? was.dump() : "unset",
            " vs ", value.dump(), "); resume with the run's settings (--config ", config_path.string(), ") or use a new folder"));
      }
    }
    if (config.mode == "router") t->resumed_experts_ = saved->value("experts_sha256", std::vector<std::string>{});
  } else if (t->lead() && fs::exists(config_path, ec)) {  // other ranks wait for rank 0's verdict
    return absl::AlreadyExistsError(absl::StrCat(inputs.run_dir, ": already holds a run; continue it with --resume or choose another folder"));
  }

  // Model and trained tensors.
  if (config.mode == "pretrain") {
    absl::StatusOr<ModelConfig> mc = ModelConfig::Preset(config.preset);
    if (!mc.ok()) return mc.status();
    if (!config.tokenizer.empty()) {
      // The preset's shape with the tokenizer's vocabulary (rows padded to a multiple of 64) and ids.
      absl::StatusOr<std::unique_ptr<Tokenizer>> hf = LoadHfTokenizer(config.tokenizer);
      if (!hf.ok()) return hf.status();
      mc->vocab_size = ((*hf)->vocab_size() + 63) / 64 * 64;
      mc->bos_token_id = (*hf)->bos_id();
      mc->eos_token_ids = {(*hf)->eos_id()};
      mc->pad_token_id = (*hf)->pad_id();
      if (absl::Status s = mc->Validate(); !s.ok()) return s;
    }
    absl::StatusOr<FlexOlmoModel> m = FlexOlmoModel::Create(*mc, at::kFloat, config.seed);
    if (!m.ok()) return m.status();
    t->model_ = *std::move(m);
    t->model_->To(t->device_);
    for (NamedTensor& nt : t->model_->NamedParameters()) {
      nt.tensor.requires_grad_(true);
      t->trainable_.push_back(nt);
    }
    t->anchor_id_ = "";
  } else if (config.mode == "router") {
    // The merged model; only its routers (rows [E, H] and biases [E], the public expert's too) train.
    if (inputs.modules.empty()) return Bad("router tuning needs the merged modules: pass --module FILE for each, in router order");
    absl::StatusOr<Anchor> anchor = LoadAnchor(inputs.anchor_dir, /*require_router_pub=*/true, at::kFloat);
    if (!anchor.ok()) return anchor.status();
    MergeOptions mo;
    mo.top_k = config.top_k;
    absl::StatusOr<MergedModel> merged = MergeExperts(*anchor, inputs.modules, mo);
    if (!merged.ok()) return merged.status();
    t->anchor_id_ = anchor->id;
    for (const MergedExpert& e : merged->experts) t->tuned_experts_.push_back(e.sha256);
    if (resume && t->resumed_experts_ != t->tuned_experts_) {
      return absl::FailedPreconditionError(absl::StrCat(
          inputs.run_dir, ": was started with other modules (or another order); resume with the same --module files or use a new folder"));
    }
    t->model_ = std::move(merged->model);
    t->model_->To(t->device_);
    std::vector<LayerWeights>& layers = t->model_->mutable_layers();
    for (size_t l = 0; l < layers.size(); ++l) {
      layers[l].router = layers[l].router.to(at::kFloat).clone().requires_grad_(true);
      t->trainable_.push_back({absl::StrCat("layers.", l, ".router.weight"), layers[l].router});
      if (layers[l].router_bias.defined()) {
        layers[l].router_bias = layers[l].router_bias.to(at::kFloat).clone().requires_grad_(true);
        t->trainable_.push_back({absl::StrCat("layers.", l, ".router.bias"), layers[l].router_bias});
      }
    }
  } else {
    // fp32 master weights (a bf16 anchor converts exactly), on the training device before any
    // trained leaf is made from them.
    absl::StatusOr<Anchor> anchor = LoadAnchor(inputs.anchor_dir, /*require_router_pub=*/config.mode == "expert", at::kFloat);
    if (!anchor.ok()) return anchor.status();
    anchor->model.To(t->device_);
    t->anchor_id_ = anchor->id;
    const FlexOlmoModel& base = anchor->model;
    ModelConfig mc = base.config();
    std::vector<NamedTensor> named = base.NamedParameters();
    auto find = [&](const std::string& name) {
      for (const NamedTensor& nt : named) {
        if (nt.name == name) return nt.tensor;
      }
      TORCH_CHECK(false, "internal: anchor has no tensor ", name);
    };
    std::vector<LayerWeights> layers = base.layers();  // shares the anchor's tensors (frozen)
    const bool has_lm_head = !mc.tie_word_embeddings;
    // Under bf16 autocast the frozen matrices and the embedding table of a bf16 checkpoint (every
    // OLMo-2 release) are kept in bf16: their values are bf16 already, and the products read them in
    // bf16 anyway — the same numbers at half the memory (MemoryPlanSettings::bf16_frozen). A tensor
    // whose values bf16 cannot hold exactly stays fp32, so the frozen weights stay the anchor's to
    // the bit (export checks them). Norms and r_pub stay fp32; the trained copies are made first.
    const bool compact = t->autocast_ == at::kBFloat16;
    auto frozen = [&](const at::Tensor& w) {
      if (!compact) return w;
      at::Tensor narrow = w.to(at::kBFloat16);
      return narrow.to(w.scalar_type()).equal(w) ? narrow : w;
    };
    at::Tensor embed = frozen(find("model.embed_tokens.weight"));
    at::Tensor lm_head = has_lm_head ? frozen(find("lm_head.weight")) : at::Tensor();
    for (int64_t l = 0; l < mc.num_hidden_layers; ++l) {
      const ExpertWeights& ffn = base.layers()[l].experts[0];
      // The trained FFN starts as a copy of the anchor's (fp32 master weights for the optimizer).
      ExpertWeights trained{ffn.gate_proj.clone().requires_grad_(true), ffn.up_proj.clone().requires_grad_(true),
                            ffn.down_proj.clone().requires_grad_(true)};
      for (at::Tensor* w : {&layers[l].q_proj, &layers[l].k_proj, &layers[l].v_proj, &layers[l].o_proj}) *w = frozen(*w);
      const std::string p = absl::StrCat("layers.", l, ".");
      t->trainable_.push_back({p + "gate_proj.weight", trained.gate_proj});
      t->trainable_.push_back({p + "up_proj.weight", trained.up_proj});
      t->trainable_.push_back({p + "down_proj.weight", trained.down_proj});
      if (config.mode == "dense") {
        layers[l].experts = {trained};
      } else {
        layers[l].experts = {ExpertWeights{frozen(ffn.gate_proj), frozen(ffn.up_proj), frozen(ffn.down_proj)}, trained};
      }
    }
    if (config.mode == "expert") {
      if (inputs.router_init.empty()) {
        return Bad("expert training needs the owner's router embedding: make it with `flexfed-owner router-init` and pass --router-init FILE");
      }
      absl::StatusOr<RouterEmbedding> ri = ReadRouterEmbedding(inputs.router_init, mc.num_hidden_layers, mc.hidden_size);
      if (!ri.ok()) return ri.status();
      for (int64_t l = 0; l < mc.num_hidden_layers; ++l) {
        t->router_pub_.push_back(anchor->router_pub.rows[l].to(t->device_, at::kFloat).view({1, mc.hidden_size}));
        at::Tensor row = ri->rows[l].to(t->device_, at::kFloat).clone().requires_grad_(true);
        t->router_rows_.push_back(row);
        t->trainable_.push_back({absl::StrCat("layers.", l, ".router.weight"), row});
        if (config.router_bias) {
          at::Tensor bias = (ri->biases.empty() ? at::zeros({1}, at::kFloat) : ri->biases[l].to(at::kFloat))
                                .to(t->device_)
                                .clone()
                                .requires_grad_(true);
          t->router_bias_.push_back(bias);
          t->trainable_.push_back({absl::StrCat("layers.", l, ".router.bias"), bias});
        }
      }
      ComposeRouters(t->router_pub_, t->router_rows_, t->router_bias_, layers);
      mc.model_type = "flex_olmo";
      mc.num_experts = 2;
      mc.num_experts_per_tok = config.top_k;
      mc.norm_topk_prob = false;
    }
    absl::StatusOr<FlexOlmoModel> m =
        FlexOlmoModel::Assemble(mc, embed, std::move(layers), find("model.norm.weight"), lm_head);
    if (!m.ok()) return m.status();
    t->model_ = *std::move(m);
    t->Compose();
  }

  t->model_->set_activation_checkpointing(config.activation_checkpointing);

  // Data.
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok =
      TokenizerForModel(config.mode == "pretrain" ? config.tokenizer : inputs.anchor_dir, t->model_->config().vocab_size);
  if (!tok.ok()) return tok.status();
  t->tokenizer_ = *std::move(tok);
  CorpusOptions copts;
  copts.text_field = config.text_field;
  absl::StatusOr<TokenCorpus> corpus = TokenCorpus::Build(config.data, *t->tokenizer_, copts, inputs.cache_dir);
  if (!corpus.ok()) return corpus.status();
  DocumentSplit split = SplitDocuments(corpus->num_documents(), config.validation_fraction, config.seed);
  t->train_ = std::make_unique<PackedSequences>(*corpus, split.train, config.seq_len, t->tokenizer_->eos_id());
  t->val_ = std::make_unique<PackedSequences>(*corpus, split.validation, config.seq_len, t->tokenizer_->eos_id());
  if (t->train_->size() < config.batch_size) {
    return Bad(absl::StrCat("the training data makes ", t->train_->size(), " sequences of ", config.seq_len,
                            " tokens, fewer than one batch of ", config.batch_size,
                            "; give more text or lower --seq-len/--batch-size"));
  }
  const int64_t val_count = std::min<int64_t>(t->val_->size(), config.val_batches * config.batch_size);
  for (int64_t i = 0; i < val_count; ++i) t->val_indices_.push_back(i);

  t->total_steps_ = config.max_steps > 0 ? config.max_steps
                                         : (config.token_budget + config.TokensPerStep() - 1) / config.TokensPerStep();
  if (config.dp()) {
    const int64_t expected = config.batch_size * config.grad_accum;
    if (expected > t->train_->size()) {
      return Bad(absl::StrCat("DP-SGD samples batch_size × grad_accum = ", expected, " of the ", t->train_->size(),
                              " training sequences on average; give more text or a smaller --batch-size"));
    }
    t->dp_q_ = static_cast<double>(expected) / static_cast<double>(t->train_->size());
    if (config.dp_noise_multiplier >= 0) {
      t->dp_sigma_ = config.dp_noise_multiplier;
    } else {
      absl::StatusOr<double> sigma = NoiseMultiplierForEpsilon(config.dp_epsilon, config.dp_delta, t->dp_q_, t->total_steps_);
      if (!sigma.ok()) return sigma.status();
      t->dp_sigma_ = *sigma;
    }
  }
  AdamWOptions aopts{config.beta1, config.beta2, config.eps, config.weight_decay,
                     config.optimizer_moments == "bf16" ? at::kBFloat16 : at::kFloat};
  std::vector<bool> owned;
  if (group != nullptr) {
    std::vector<int64_t> numels;
    for (const NamedTensor& nt : t->trainable_) numels.push_back(nt.tensor.numel());
    t->state_owner_ = ShardOptimizerState(numels, group->world_size());
    for (int r : t->state_owner_) owned.push_back(r == group->rank());
  }
  t->optimizer_ = std::make_unique<AdamW>(t->trainable_, aopts, owned);
  const char* overlap = std::getenv("FLEXFED_GRADIENT_OVERLAP");
  if (group != nullptr && !config.dp() && !(overlap != nullptr && std::string(overlap) == "off")) {
    std::vector<at::Tensor> params;
    for (const NamedTensor& nt : t->trainable_) params.push_back(nt.tensor);
    t->overlapped_sum_ = std::make_unique<OverlappedGradientSum>(*group, std::move(params));
  }
  t->order_ = Permutation(t->train_->size(), config.seed);

  // MFU: 6 FLOPs per trained weight and 4 per frozen weight used (forward + input gradient) per
  // token, plus causal attention; against a GEMM rate measured now.
  const ModelConfig& mc = t->model_->config();
  double trained = 0, frozen = 0;
  for (const NamedTensor& nt : t->trainable_) trained += nt.tensor.numel();
  for (const NamedTensor& nt : t->FrozenTensors()) {
    if (nt.name != "model.embed_tokens.weight") frozen += nt.tensor.numel();
  }
  const double attention = 12.0 * (config.seq_len + 1) / 2.0 * mc.num_attention_heads * mc.head_dim * mc.num_hidden_layers;
  t->flops_per_token_ = 6 * trained + 4 * frozen + attention;
  if (config.mode == "pretrain") t->flops_per_token_ -= 6.0 * mc.vocab_size * mc.hidden_size;  // embedding lookup
  const int64_t gemm_rows = std::min<int64_t>(t->device_.is_cuda() ? 8192 : 2048, config.batch_size * config.seq_len);
  t->gemm_rate_ = MeasureGemmRate(gemm_rows, mc.hidden_size, mc.intermediate_size, t->device_,
                                  t->autocast_.value_or(at::kFloat));

  if (t->lead()) {
    fs::create_directories(run / "checkpoints", ec);
    if (ec) return absl::InternalError(absl::StrCat(inputs.run_dir, ": cannot create: ", ec.message()));
  }
  if (resume) {
    if (absl::Status s = t->Resume(); !s.ok()) return s;
  } else if (t->lead()) {
    json echo = {{"settings", config.IdentityJson()}, {"cadence", config.ToJson()}, {"anchor_sha256", t->anchor_id_},
                 {"anchor_dir", inputs.anchor_dir}, {"router_init", inputs.router_init}, {"modules", inputs.modules},
                 {"experts_sha256", t->tuned_experts_}, {"token_cache", corpus->key()},
                 {"documents", {{"train", split.train.size()}, {"validation", split.validation.size()}}},
                 {"total_steps", t->total_steps_}};
    if (config.dp()) {
      DpAccount planned = *t->Privacy();
      planned.steps = t->total_steps_;
      RdpAccountant accountant;
      accountant.Compose(t->dp_q_, t->dp_sigma_, t->total_steps_);
      planned.epsilon = accountant.Epsilon(config.dp_delta).epsilon;
      echo["dp"] = planned.ToJson();  // what the whole run will spend
    }
    if (absl::Status s = WriteFileAtomically(config_path.string(), echo.dump(2) + "\n"); !s.ok()) return s;
    std::error_code ignored;
    fs::remove(run / kMetricsFile, ignored);
  }
  return t;
}

std::vector<NamedTensor> Trainer::FrozenTensors() const {
  std::vector<NamedTensor> frozen;
  for (const NamedTensor& nt : model_->NamedParameters()) {
    const bool trained = std::any_of(trainable_.begin(), trainable_.end(), [&](const NamedTensor& t) {
      return t.tensor.is_same(nt.tensor);
    });
    // Composed routers and biases are not leaves; their frozen part is r_pub.
    if (!trained && nt.tensor.is_leaf()) frozen.push_back(nt);
  }
  for (size_t l = 0; l < router_pub_.size(); ++l) frozen.push_back({absl::StrCat("router_pub.", l), router_pub_[l]});
  return frozen;
}

std::string Trainer::ComputeDescription() const {
  std::string where = device_.str();
  if (device_.is_cpu()) where += absl::StrCat(" (", at::get_num_threads(), " threads)");
  const bool bf16_frozen = !model_->layers().empty() && model_->layers()[0].q_proj.scalar_type() == at::kBFloat16;
  return absl::StrCat(where,
                      !autocast_   ? ", fp32"
                      : bf16_frozen ? ", bf16 autocast (fp32 master weights, bf16 frozen matrices)"
                                    : ", bf16 autocast (fp32 master weights)",
                      config_.optimizer_moments == "bf16" ? ", bf16 AdamW moments" : "",
                      config_.activation_checkpointing ? ", activation checkpointing" : "");
}

void Trainer::Compose() {
  if (!router_rows_.empty()) ComposeRouters(router_pub_, router_rows_, router_bias_, model_->mutable_layers());
}

// ------------------------------------------------------------------------------------ the loop

double Trainer::LearningRate(int64_t step) const {
  const double lr = config_.lr;
  if (step < config_.warmup_steps) return lr * static_cast<double>(step + 1) / static_cast<double>(config_.warmup_steps);
  const int64_t decay = std::max<int64_t>(1, total_steps_ - config_.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - config_.warmup_steps) / static_cast<double>(decay));
  const double floor = lr * config_.min_lr_ratio;
  return floor + (lr - floor) * 0.5 * (1.0 + std::cos(kPi * progress));
}

std::vector<int64_t> Trainer::NextBatch() {
  std::vector<int64_t> indices;
  while (static_cast<int64_t>(indices.size()) < config_.batch_size) {
    if (position_ >= static_cast<int64_t>(order_.size())) {
      ++epoch_;
      position_ = 0;
      order_ = Permutation(train_->size(), config_.seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(epoch_));
    }
    indices.push_back(order_[position_++]);
  }
  return indices;
}

std::optional<DpAccount> Trainer::Privacy() const {
  if (!config_.dp()) return std::nullopt;
  DpAccount a;
  a.noise_multiplier = dp_sigma_;
  a.max_grad_norm = config_.dp_max_grad_norm;
  a.sampling_rate = dp_q_;
  a.delta = config_.dp_delta;
  a.steps = step_;
  a.expected_batch = config_.batch_size * config_.grad_accum;
  a.sequence_tokens = config_.seq_len;
  RdpAccountant accountant;
  accountant.Compose(dp_q_, dp_sigma_, step_);
  a.epsilon = accountant.Epsilon(config_.dp_delta).epsilon;
  return a;
}

at::Tensor Trainer::SequenceLosses(const std::vector<int64_t>& sequences, ForwardTrace& trace) {
  const ModelConfig& mc = model_->config();
  at::Tensor batch = train_->Batch(sequences).to(device_);
  const int64_t b = batch.size(0), t = config_.seq_len;
  at::Tensor inputs = batch.narrow(1, 0, t), targets = batch.narrow(1, 1, t).reshape({-1});
  Compose();
  at::Tensor losses;
  {
    // The forward under autocast (when on); the backward outside it, as torch.autocast prescribes.
    std::optional<AutocastScope> autocast;
    if (autocast_) autocast.emplace(device_.type(), *autocast_);
    // The output head and the loss a chunk of tokens at a time: never the whole [b·t, V] logits.
    at::Tensor hidden = model_->ForwardHidden(inputs, {}, nullptr, &trace);
    losses = ChunkedCrossEntropy(hidden.reshape({b * t, mc.hidden_size}), model_->lm_head(), targets).view({b, t}).mean(1);
    if (config_.z_loss > 0 && !trace.router_logits.empty()) {
      at::Tensor z = at::zeros({b}, losses.options());
      for (const at::Tensor& logits_l : trace.router_logits) z = z + at::logsumexp(logits_l, -1).pow(2).view({b, t}).mean(1);
      losses = losses + config_.z_loss * z;
    }
  }
  tokens_ += inputs.numel();
  if (!trace.expert_indices.empty()) {
    // Each layer's first choices, counted on the device in one scatter: row l, column e.
    const int64_t layers = static_cast<int64_t>(trace.expert_indices.size()), experts = mc.num_experts;
    std::vector<at::Tensor> first;
    for (const at::Tensor& chosen : trace.expert_indices) first.push_back(chosen.select(1, 0));
    const at::Tensor cells = at::stack(first) + at::arange(layers, first[0].options()).unsqueeze(1) * experts;
    if (!routing_counts_.defined()) routing_counts_ = at::zeros({layers, experts}, cells.options());
    routing_counts_.view({-1}).scatter_add_(0, cells.reshape({-1}), at::ones_like(cells).reshape({-1}));
  }
  return losses;
}

double Trainer::Step() {
  if (config_.dp()) return StepOn(PoissonSample(train_->size(), dp_q_, config_.seed, step_));
  std::vector<int64_t> sequences;
  for (int64_t micro = 0; micro < config_.grad_accum; ++micro) {
    std::vector<int64_t> batch = NextBatch();
    sequences.insert(sequences.end(), batch.begin(), batch.end());
  }
  return StepOn(sequences);
}

double Trainer::StepOn(const std::vector<int64_t>& step_sequences) {
  // Data-parallel: this rank's share; the loss is still the mean over every sequence of the step.
  const std::vector<int64_t> sequences =
      group_ != nullptr ? ShareOfStep(step_sequences, group_->rank(), group_->world_size()) : step_sequences;
  const int64_t tokens_before = tokens_;
  double loss_sum = 0;
  at::Tensor micro_losses;  // Σ of the plain micro-batches' losses, on the device: read once, after them all
  for (size_t begin = 0; begin < sequences.size(); begin += config_.batch_size) {
    const std::vector<int64_t> micro(sequences.begin() + begin,
                                     sequences.begin() + std::min(sequences.size(), begin + config_.batch_size));
    if (config_.dp()) {
      loss_sum += DpMicroBatch(micro);
    } else {
      // The mean over every sequence of the step: each micro-batch's share of it.
      ForwardTrace trace;
      at::Tensor losses = SequenceLosses(micro, trace);
      // The step's last backward: its gradients are final, summed across the ranks as they arrive.
      if (overlapped_sum_ != nullptr && begin + config_.batch_size >= sequences.size()) overlapped_sum_->Arm();
      (losses.sum() / static_cast<double>(step_sequences.size())).backward();
      const at::Tensor sum = losses.detach().sum().to(at::kDouble);
      micro_losses = micro_losses.defined() ? micro_losses + sum : sum;
    }
  }
  if (micro_losses.defined()) loss_sum += micro_losses.item<double>();  // the step's work done (a GPU's too)
  if (group_ != nullptr) {
    const auto start = Clock::now();
    if (overlapped_sum_ != nullptr) {
      overlapped_sum_->Finish();
    } else {
      SumGradients();
    }
    at::Tensor totals = at::tensor({loss_sum, static_cast<double>(tokens_ - tokens_before)}, at::kDouble);
    group_->SumInPlace({totals});
    loss_sum = totals[0].item<double>();
    tokens_ = tokens_before + static_cast<int64_t>(totals[1].item<double>());
    FinishDeviceWork();  // NCCL's collectives run on their own stream: counted until they are done
    communication_seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
  }
  if (config_.dp()) {
    // Σ_s c_s ∇ℓ_s + N(0, σ²C²), over the expected batch (the same divisor whatever was drawn).
    AddGaussianNoise(trainable_, dp_sigma_ * config_.dp_max_grad_norm, config_.seed, step_);
    const double expected = static_cast<double>(config_.batch_size * config_.grad_accum);
    for (const NamedTensor& nt : trainable_) {
      if (nt.tensor.grad().defined()) nt.tensor.mutable_grad().div_(expected);
    }
    last_grad_norm_ = ClipGradNorm(trainable_, /*max_norm=*/0);
  } else {
    last_grad_norm_ = ClipGradNorm(trainable_, config_.grad_clip);
  }
  optimizer_->Step(LearningRate(step_));
  if (group_ != nullptr) {
    FinishDeviceWork();  // the update itself is not communication
    const auto start = Clock::now();
    BroadcastUpdated();
    FinishDeviceWork();
    communication_seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
  }
  optimizer_->ZeroGrad();
  ++step_;
  return step_sequences.empty() ? 0.0 : loss_sum / static_cast<double>(step_sequences.size());
}

bool Trainer::lead() const { return group_ == nullptr || group_->rank() == 0; }

void Trainer::FinishDeviceWork() const {
  if (device_.is_cuda()) torch::cuda::synchronize(device_.index());
}

void Trainer::SumGradients() {
  at::NoGradGuard no_grad;
  // A rank with no sequence in this step (a small DP sample) has no gradients: it adds zeros, and a
  // tensor no rank has a gradient for stays without one, as on one process.
  at::Tensor defined = at::zeros({static_cast<int64_t>(trainable_.size())}, at::kFloat);
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < trainable_.size(); ++i) {
    at::Tensor p = trainable_[i].tensor;
    if (p.grad().defined()) {
      defined[static_cast<int64_t>(i)] = 1.0f;
    } else {
      p.mutable_grad() = at::zeros_like(p);
    }
    grads.push_back(p.grad());
  }
  group_->SumInPlace({defined});
  group_->SumInPlace(grads);
  for (size_t i = 0; i < trainable_.size(); ++i) {
    if (defined[static_cast<int64_t>(i)].item<float>() == 0.0f) trainable_[i].tensor.mutable_grad() = at::Tensor();
  }
}

void Trainer::BroadcastUpdated() {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < trainable_.size(); ++i) group_->Broadcast(trainable_[i].tensor, state_owner_[i]);
}

bool Trainer::AnyRank(bool flag) {
  if (group_ == nullptr) return flag;
  at::Tensor f = at::tensor({flag ? 1.0f : 0.0f});
  group_->SumInPlace({f});
  return f.item<float>() > 0;
}

std::vector<std::vector<double>> Trainer::TakeRoutingFractions() {
  const bool moe = model_->config().model_type == "flex_olmo";
  if (!moe || (group_ == nullptr && !routing_counts_.defined())) return {};
  // Every rank contributes a [layers, experts] table, zeros where it routed nothing.
  const int64_t layers = model_->config().num_hidden_layers, experts = model_->config().num_experts;
  at::Tensor counts = routing_counts_.defined() ? routing_counts_.to(at::kCPU).to(at::kDouble)
                                                : at::zeros({layers, experts}, at::kDouble);
  routing_counts_ = at::Tensor();
  if (group_ != nullptr) group_->SumInPlace({counts});
  counts = counts.contiguous();
  const double* c = counts.data_ptr<double>();
  std::vector<std::vector<double>> fractions(static_cast<size_t>(counts.size(0)));
  for (int64_t l = 0; l < counts.size(0); ++l) {
    double sum = 0;
    for (int64_t e = 0; e < experts; ++e) sum += c[l * experts + e];
    for (int64_t e = 0; e < experts; ++e) fractions[l].push_back(sum > 0 ? c[l * experts + e] / sum : 0.0);
  }
  return fractions;
}

std::vector<NamedTensor> Trainer::FullOptimizerState() {
  std::vector<NamedTensor> state = optimizer_->State();
  if (group_ == nullptr) return state;
  // Each moment from the rank that keeps it; rank 0 collects them in the one-process format.
  std::vector<NamedTensor> full = {state[0]};  // "step"
  for (size_t i = 0; i < trainable_.size(); ++i) {
    const at::Tensor& p = trainable_[i].tensor;
    const bool mine = optimizer_->owns(i);
    // Sent as fp32 whatever the moments' dtype (bf16 widens exactly; every backend carries fp32).
    at::Tensor m = mine ? optimizer_->exp_avg(i).to(at::kFloat) : at::empty(p.sizes(), p.options().dtype(at::kFloat).requires_grad(false));
    at::Tensor v = mine ? optimizer_->exp_avg_sq(i).to(at::kFloat) : at::empty(p.sizes(), p.options().dtype(at::kFloat).requires_grad(false));
    group_->Broadcast(m, state_owner_[i]);
    group_->Broadcast(v, state_owner_[i]);
    if (lead()) {
      full.push_back({trainable_[i].name + ".exp_avg", m.to(optimizer_->moment_dtype())});
      full.push_back({trainable_[i].name + ".exp_avg_sq", v.to(optimizer_->moment_dtype())});
    }
  }
  return full;
}

ForwardTrace Trainer::DpTrace() const {
  ForwardTrace trace;
  const bool expert = config_.mode == "expert";
  trace.ffn_expert = expert ? 1 : 0;  // the trained FFN: expert 1 of the two-expert model, or the dense FFN
  trace.want_router_inputs = expert;
  return trace;
}

at::Tensor Trainer::GradientNormsSq(const at::Tensor& losses, const ForwardTrace& trace) {
  const int64_t b = losses.size(0), t = config_.seq_len;
  const bool expert = config_.mode == "expert";
  // The loss's gradient at each trained linear layer's output and at the router logits (the
  // graph is kept for the clipped backward that follows).
  std::vector<at::Tensor> outputs;
  for (const FfnActivations& f : trace.ffn) {
    if (!f.rows.defined()) continue;  // no token of this micro-batch chose the expert in this layer
    outputs.insert(outputs.end(), {f.a, f.b, f.y});
  }
  if (expert) outputs.insert(outputs.end(), trace.router_logits.begin(), trace.router_logits.end());
  const std::vector<at::Tensor> grads =
      torch::autograd::grad({losses.sum()}, outputs, /*grad_outputs=*/{}, /*retain_graph=*/true,
                            /*create_graph=*/false, /*allow_unused=*/true);
  // Each sequence's gradient norm over every trained tensor, without forming the gradients.
  at::Tensor norms_sq = at::zeros({b}, losses.options().dtype(at::kDouble));
  size_t next = 0;
  for (const FfnActivations& f : trace.ffn) {
    if (!f.rows.defined()) continue;
    const at::Tensor &ga = grads[next], &gb = grads[next + 1], &gy = grads[next + 2];
    next += 3;
    if (ga.defined()) AddLinearNormsSq(f.x, ga, f.rows, t, norms_sq);  // gate_proj: dW = gaᵀ·x
    if (gb.defined()) AddLinearNormsSq(f.x, gb, f.rows, t, norms_sq);  // up_proj:   dW = gbᵀ·x
    if (gy.defined()) AddLinearNormsSq(f.h, gy, f.rows, t, norms_sq);  // down_proj: dW = gyᵀ·h
  }
  if (expert) {
    for (size_t l = 0; l < trace.router_logits.size(); ++l) {
      const at::Tensor& glogits = grads[next + l];
      if (!glogits.defined()) continue;
      const at::Tensor g1 = glogits.select(1, 1);  // the owner's logit: h·r_i (+ min(b_i, 0))
      AddRowNormsSq(trace.router_inputs[l].reshape({b * t, -1}), g1, t, norms_sq);  // r_i: Σ_t g_t·h_t
      if (!router_bias_.empty()) {
        // min(b, 0) passes the gradient where b ≤ 0 (as clamp_max's backward does).
        const double pass = router_bias_[l].item<double>() <= 0 ? 1.0 : 0.0;
        AddScalarNormsSq(g1 * pass, t, norms_sq);
      }
    }
  }
  return norms_sq;
}

at::Tensor Trainer::SequenceGradientNormsSq(const std::vector<int64_t>& sequences) {
  TORCH_CHECK(config_.mode == "expert" || config_.mode == "dense", "per-sequence norms are for expert and dense training");
  ForwardTrace trace = DpTrace();
  const int64_t tokens = tokens_;
  at::Tensor norms_sq = GradientNormsSq(SequenceLosses(sequences, trace), trace);
  tokens_ = tokens;  // a measurement, not training
  routing_counts_ = at::Tensor();
  return norms_sq;
}

double Trainer::DpMicroBatch(const std::vector<int64_t>& sequences) {
  ForwardTrace trace = DpTrace();
  at::Tensor losses = SequenceLosses(sequences, trace);
  const at::Tensor norms_sq = GradientNormsSq(losses, trace);
  // Σ_s c_s ∇ℓ_s into the gradients. The norms come from the values autograd uses; a small margin
  // (larger under bf16 autocast) keeps rounding from letting a clipped gradient exceed C.
  const double margin = autocast_ ? 1.02 : 1.0001;
  const at::Tensor c = ClipFactors(norms_sq * (margin * margin), config_.dp_max_grad_norm).to(losses.scalar_type());
  (losses * c.detach()).sum().backward();
  return losses.sum().item<double>();
}

EvalResult Trainer::Validate() {
  Compose();
  std::optional<AutocastScope> autocast;
  if (autocast_) autocast.emplace(device_.type(), *autocast_);
  return Evaluate(*model_, *val_, val_indices_, config_.batch_size, *tokenizer_);
}

absl::Status Trainer::SaveCheckpoint() {
  const std::vector<NamedTensor> optimizer_state = FullOptimizerState();  // every rank takes part
  if (!lead()) return absl::OkStatus();
  const fs::path dir = fs::path(inputs_.run_dir) / "checkpoints";
  const std::string name = CheckpointName(step_);
  const fs::path tmp = dir / absl::StrCat(name, ".tmp");
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return absl::InternalError(absl::StrCat(tmp.string(), ": cannot create: ", ec.message()));
  if (absl::Status s = WriteSafetensors((tmp / "trainable.safetensors").string(), trainable_); !s.ok()) return s;
  if (absl::Status s = WriteSafetensors((tmp / "optimizer.safetensors").string(), optimizer_state); !s.ok()) return s;
  json state = {{"step", step_}, {"tokens", tokens_}, {"epoch", epoch_}, {"position", position_},
                {"anchor_sha256", anchor_id_}, {"settings", config_.IdentityJson()}};
  if (std::optional<DpAccount> dp = Privacy()) state["dp"] = dp->ToJson();  // what export records
  if (absl::Status s = WriteFileAtomically((tmp / "state.json").string(), state.dump(2) + "\n"); !s.ok()) return s;
  fs::remove_all(dir / name, ec);
  fs::rename(tmp, dir / name, ec);
  if (ec) return absl::InternalError(absl::StrCat((dir / name).string(), ": cannot finish checkpoint: ", ec.message()));
  if (absl::Status s = WriteFileAtomically((dir / "latest").string(), name); !s.ok()) return s;
  // Keep the newest `keep_checkpoints`.
  std::vector<std::string> all;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string f = entry.path().filename().string();
    if (entry.is_directory() && f.rfind("step-", 0) == 0 && f.find(".tmp") == std::string::npos) all.push_back(f);
  }
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + config_.keep_checkpoints < all.size(); ++i) fs::remove_all(dir / all[i], ec);
  return absl::OkStatus();
}

absl::Status Trainer::Resume() {
  absl::StatusOr<std::string> dir = LatestCheckpoint(inputs_.run_dir);
  if (!dir.ok()) return dir.status();
  absl::StatusOr<json> state = ReadJsonFile((fs::path(*dir) / "state.json").string());
  if (!state.ok()) return state.status();
  if ((*state)["anchor_sha256"] != anchor_id_) {
    return absl::FailedPreconditionError(absl::StrCat(inputs_.run_dir, ": was trained against another anchor (",
                                                      (*state)["anchor_sha256"].get<std::string>().substr(0, 12),
                                                      "…); point --anchor to that anchor"));
  }
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> weights = SafetensorsFile::Open((fs::path(*dir) / "trainable.safetensors").string());
  if (!weights.ok()) return weights.status();
  {
    at::NoGradGuard no_grad;
    for (NamedTensor& nt : trainable_) {
      absl::StatusOr<at::Tensor> saved = (*weights)->Get(nt.name);
      if (!saved.ok() || saved->sizes() != nt.tensor.sizes()) {
        return absl::DataLossError(absl::StrCat(*dir, ": checkpoint lacks '", nt.name, "' or has another shape"));
      }
      nt.tensor.copy_(*saved);
    }
  }
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> opt = SafetensorsFile::Open((fs::path(*dir) / "optimizer.safetensors").string());
  if (!opt.ok()) return opt.status();
  std::vector<NamedTensor> opt_state;
  for (const std::string& name : (*opt)->Names()) opt_state.push_back({name, *(*opt)->Get(name)});
  if (absl::Status s = optimizer_->LoadState(opt_state); !s.ok()) return s;
  step_ = (*state)["step"].get<int64_t>();
  tokens_ = (*state)["tokens"].get<int64_t>();
  epoch_ = (*state)["epoch"].get<int64_t>();
  position_ = (*state)["position"].get<int64_t>();
  order_ = epoch_ == 0 ? Permutation(train_->size(), config_.seed)
                       : Permutation(train_->size(), config_.seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(epoch_));
  Compose();
  // Metrics logged after that checkpoint belong to a future that did not happen: drop them.
  const std::string metrics = (fs::path(inputs_.run_dir) / kMetricsFile).string();
  absl::StatusOr<std::string> text = lead() ? ReadFile(metrics) : absl::StatusOr<std::string>(absl::NotFoundError("not rank 0"));
  if (text.ok()) {
    std::string kept;
    std::istringstream lines(*text);
    for (std::string line; std::getline(lines, line);) {
      json j = json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.contains("step") && j["step"].get<int64_t>() <= step_) kept += line + "\n";
    }
    if (absl::Status s = WriteFileAtomically(metrics, kept); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status Trainer::WriteModel() {
  if (config_.mode == "router") {  // the tuned routers alone, versioned apart from the modules
    RouterTuning tuning{anchor_id_, tuned_experts_, {}, {}, {}};
    for (const LayerWeights& lw : model_->layers()) {
      tuning.rows.push_back(lw.router);
      if (lw.router_bias.defined()) tuning.biases.push_back(lw.router_bias);
    }
    tuning.metadata = {{"steps", std::to_string(step_)}, {"tokens", std::to_string(tokens_)},
                       {"settings", config_.IdentityJson().dump()}};
    return WriteRouterTuning((fs::path(inputs_.run_dir) / kRouterTuningFile).string(), tuning);
  }
  Compose();
  const fs::path dir = fs::path(inputs_.run_dir) / "model";
  if (absl::Status s = model_->Save(dir.string()); !s.ok()) return s;
  // The model carries the tokenizer it was trained with: a pretrained model the one it was given,
  // an owner's model the anchor's (a BPE anchor's model read as bytes would score and generate
  // garbage).
  const std::string source = config_.mode == "pretrain" ? config_.tokenizer : inputs_.anchor_dir;
  bool copied = false;
  for (const char* name : {kHfTokenizerFile, kHfTokenizerConfigFile, "flexfed_tokenizer.json"}) {
    const fs::path from = fs::path(source) / name;
    if (source.empty() || !fs::exists(from)) continue;
    absl::StatusOr<std::string> bytes = ReadFile(from.string());
    if (!bytes.ok()) return bytes.status();
    if (absl::Status s = WriteFileAtomically((dir / name).string(), *bytes); !s.ok()) return s;
    copied = true;
  }
  if (copied) return absl::OkStatus();
  return WriteFileAtomically((dir / "flexfed_tokenizer.json").string(), "{\"type\": \"bytes\"}\n");
}

void Trainer::ReportMemory(std::ostream& metrics, ProgressReporter* progress) const {
  json j = {{"step", step_}};
  std::string planned;
  if (planned_bytes_ >= 0) {
    j["planned_bytes"] = planned_bytes_;
    planned = absl::StrCat(" (plan: ", FormatMemory(planned_bytes_), ")");
  }
  std::string line;
#if FLEXFED_WITH_CUDA
  if (device_.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index());
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    j["peak_device_bytes"] = stats.allocated_bytes[all].peak;
    j["peak_reserved_bytes"] = stats.reserved_bytes[all].peak;
    line = absl::StrCat("memory after the first step: peak ", FormatMemory(stats.allocated_bytes[all].peak), " allocated",
                        planned, ", ", FormatMemory(stats.reserved_bytes[all].peak), " reserved by PyTorch's allocator");
  }
#endif
  if (line.empty()) {
    const int64_t peak = ProcessStatusBytes("VmHWM");
    if (peak < 0) return;
    j["peak_resident_bytes"] = peak;
    line = absl::StrCat("memory after the first step: peak resident ", FormatMemory(peak), planned,
                        "; the process also holds freed memory for reuse");
  }
  metrics << j.dump() << "\n" << std::flush;
  if (progress != nullptr) progress->Line(line);
}

absl::StatusOr<TrainOutcome> Trainer::Run(const std::atomic<bool>* stop, ProgressReporter* progress) {
  std::ofstream metrics;  // rank 0's; the other ranks log nothing
  if (lead()) {
    metrics.open(fs::path(inputs_.run_dir) / kMetricsFile, std::ios::app);
    if (!metrics) return absl::InternalError(absl::StrCat(inputs_.run_dir, ": cannot write ", kMetricsFile));
  } else {
    progress = nullptr;
  }
  TrainOutcome out;
  const auto start = Clock::now();
  const int64_t first_step = step_;
  auto window_start = Clock::now();
  int64_t window_tokens = 0;
  double window_loss = 0;
  int64_t window_steps = 0;
  communication_seconds_ = 0;
  while (step_ < total_steps_) {
    const int64_t tokens_before = tokens_;
    const double loss = Step();
    out.last_loss = loss;
    window_tokens += tokens_ - tokens_before;
    window_loss += loss;
    ++window_steps;
    if (step_ == first_step + 1 && lead()) ReportMemory(metrics, progress);
    const bool stopping = AnyRank(stop != nullptr && stop->load());
    const bool last = step_ == total_steps_;
    if (step_ % config_.log_every == 0 || last || stopping) {
      const double seconds = std::chrono::duration<double>(Clock::now() - window_start).count();
      const double tps = window_tokens / std::max(seconds, 1e-9);
      const double mfu = tps * flops_per_token_ / gemm_rate_;
      json j = {{"step", step_}, {"tokens", tokens_}, {"loss", window_loss / window_steps}, {"lr", LearningRate(step_ - 1)},
                {"grad_norm", last_grad_norm_}, {"tokens_per_s", tps}, {"mfu", mfu}};
      std::string privacy;
      const std::vector<std::vector<double>> routing = TakeRoutingFractions();
      if (std::optional<DpAccount> dp = Privacy()) {
        j["epsilon"] = dp->epsilon;
        privacy = absl::StrFormat(" | ε %.3g", dp->epsilon);
      }
      if (!routing.empty()) j["routing"] = routing;  // per layer, fraction of tokens whose first choice is each expert
      std::string communication;
      if (group_ != nullptr) {
        j["communication_s"] = communication_seconds_ / window_steps;  // per step, this window
        communication = absl::StrFormat(" | comm %.0f%%", 100 * communication_seconds_ / std::max(seconds, 1e-9));
        communication_seconds_ = 0;
      }
      metrics << j.dump() << "\n" << std::flush;
      if (progress != nullptr) {
        const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
        const double eta = elapsed / std::max<int64_t>(1, step_ - first_step) * (total_steps_ - step_);
        progress->Update(step_, total_steps_,
                         absl::StrFormat("loss %.4f | lr %.2e | %.0f tok/s | MFU %.0f%%%s%s", window_loss / window_steps,
                                         LearningRate(step_ - 1), tps, 100 * mfu, communication, privacy),
                         eta);
      }
      window_start = Clock::now();
      window_tokens = 0;
      window_loss = 0;
      window_steps = 0;
    }
    if (lead() && config_.val_every > 0 && !val_indices_.empty() && (step_ % config_.val_every == 0 || last)) {
      EvalResult v = Validate();
      out.last_val_loss = v.loss;
      metrics << json({{"step", step_}, {"val_loss", v.loss}, {"val_bits_per_byte", v.bits_per_byte}}).dump() << "\n" << std::flush;
      if (progress != nullptr) {
        progress->Line(absl::StrFormat("step %d: validation loss %.4f, %.4f bits/byte", step_, v.loss, v.bits_per_byte));
      }
    }
    if ((config_.checkpoint_every > 0 && step_ % config_.checkpoint_every == 0) || last || stopping) {
      if (absl::Status s = SaveCheckpoint(); !s.ok()) return s;
    }
    if (stopping && !last) {
      out.interrupted = true;
      break;
    }
  }
  if (!out.interrupted && lead()) {
    if (absl::Status s = WriteModel(); !s.ok()) return s;
  }
  if (progress != nullptr) progress->Finish();
  out.steps = step_;
  out.tokens = tokens_;
  return out;
}

}  // namespace flexfed
