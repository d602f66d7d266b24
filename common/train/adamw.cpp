#include "common/train/adamw.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#if FLEXFED_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/adamw.cuh"
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/model/moe_dispatch.h"  // CudaKernelsBuilt
#include "kernels/adamw_ops.h"

namespace flexfed {

AdamW::AdamW(std::vector<NamedTensor> params, AdamWOptions options, std::vector<bool> owned)
    : params_(std::move(params)), owned_(std::move(owned)), options_(options) {
  if (owned_.empty()) owned_.assign(params_.size(), true);
  TORCH_CHECK(options_.moment_dtype == at::kFloat || options_.moment_dtype == at::kBFloat16,
              "AdamW: moments are kept in fp32 or bf16");
  TORCH_CHECK(owned_.size() == params_.size(), "AdamW: ", owned_.size(), " ownership flags for ", params_.size(), " parameters");
  for (size_t i = 0; i < params_.size(); ++i) {
    const NamedTensor& p = params_[i];
    TORCH_CHECK(p.tensor.requires_grad(), "AdamW: parameter ", p.name, " does not require grad");
    exp_avg_.push_back(owned_[i] ? at::zeros_like(p.tensor, options_.moment_dtype) : at::Tensor());
    exp_avg_sq_.push_back(owned_[i] ? at::zeros_like(p.tensor, options_.moment_dtype) : at::Tensor());
  }
}

void AdamWUpdate(at::Tensor& p32, const at::Tensor& g, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, double lr,
                 const AdamWOptions& o, int64_t step) {
  const double bias1 = 1.0 - std::pow(o.beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(o.beta2, static_cast<double>(step));
  if (o.weight_decay != 0) p32.mul_(1.0 - lr * o.weight_decay);
  exp_avg.mul_(o.beta1).add_(g, 1.0 - o.beta1);
  exp_avg_sq.mul_(o.beta2).addcmul_(g, g, 1.0 - o.beta2);
  at::Tensor denom = (exp_avg_sq.sqrt() / std::sqrt(bias2)).add_(o.eps);
  p32.addcdiv_(exp_avg, denom, -lr / bias1);
}

bool AdamW::StepInOnePass(at::Tensor& p, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, double lr) {
  if (p.scalar_type() != at::kFloat || !p.is_contiguous() || !exp_avg.is_contiguous() || !exp_avg_sq.is_contiguous()) {
    return false;
  }
  if (p.is_cuda() && !CudaKernelsBuilt()) return false;
  const at::Tensor g = p.grad().to(at::kFloat).contiguous();
  kernels::AdamWArgs a = kernels::AdamWStepScalars(lr, options_.beta1, options_.beta2, options_.eps,
                                                   options_.weight_decay, step_);
  a.moments = options_.moment_dtype == at::kFloat ? kernels::DType::kF32 : kernels::DType::kBF16;
  const int64_t width = options_.moment_dtype == at::kFloat ? 4 : 2;
  auto slice = [&](int64_t begin, int64_t end) {
    kernels::AdamWArgs s = a;
    s.param = p.data_ptr<float>() + begin;
    s.grad = g.data_ptr<float>() + begin;
    s.exp_avg = static_cast<char*>(exp_avg.data_ptr()) + begin * width;
    s.exp_avg_sq = static_cast<char*>(exp_avg_sq.data_ptr()) + begin * width;
    s.count = end - begin;
    return s;
  };
#if FLEXFED_WITH_CUDA
  if (p.is_cuda()) {
    const c10::cuda::CUDAGuard guard(p.device());
    kernels::AdamW(slice(0, p.numel()), c10::cuda::getCurrentCUDAStream(p.device().index()).stream());
    return true;
  }
#endif
  at::parallel_for(0, p.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    kernels::AdamWReference(slice(begin, end));
  });
  return true;
}

void AdamW::Step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  // fp32 parameters: ATen's fused AdamW, one vectorised pass over each parameter's memory (the
  // kernel torch.optim.AdamW(fused=True) runs) instead of eight elementwise passes — the update is
  // memory-bound. Grouped by device, as the kernel wants one device per call.
  auto fusable = [&](const at::Tensor& p) {
    return p.scalar_type() == at::kFloat && p.is_contiguous() && options_.moment_dtype == at::kFloat;
  };
  std::vector<std::pair<at::Device, std::array<std::vector<at::Tensor>, 4>>> fused;  // training uses one device
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i].tensor;
    if (!owned_[i] || !p.grad().defined() || !fusable(p)) continue;
    auto it = std::find_if(fused.begin(), fused.end(), [&](const auto& g) { return g.first == p.device(); });
    if (it == fused.end()) it = fused.insert(fused.end(), {p.device(), {}});
    auto& group = it->second;
    group[0].push_back(p);
    group[1].push_back(p.grad().scalar_type() == at::kFloat ? p.grad() : p.grad().to(at::kFloat));
    group[2].push_back(exp_avg_[i]);
    group[3].push_back(exp_avg_sq_[i]);
  }
  for (auto& [device, group] : fused) {
    // The kernel reads each parameter's step count from a tensor (as torch.optim keeps it).
    std::vector<at::Tensor> steps(group[0].size(), at::full({}, static_cast<double>(step_), at::TensorOptions(device).dtype(at::kFloat)));
    at::_fused_adamw_(group[0], group[1], group[2], group[3], {}, steps, lr, options_.beta1, options_.beta2,
                      options_.weight_decay, options_.eps, /*amsgrad=*/false, /*maximize=*/false);
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor p = params_[i].tensor;
    if (!owned_[i] || !p.grad().defined()) continue;
    if (fusable(p)) continue;  // stepped above
    if (StepInOnePass(p, exp_avg_[i], exp_avg_sq_[i], lr)) continue;
    at::Tensor g = p.grad().to(at::kFloat);
    // Moments and the update in fp32 whatever the parameter's and the moments' dtypes; bf16
    // moments are widened for the update and rounded back (to nearest) after it.
    at::Tensor p32 = p.scalar_type() == at::kFloat ? p : p.to(at::kFloat);
    const bool narrow = options_.moment_dtype != at::kFloat;
    at::Tensor m = narrow ? exp_avg_[i].to(at::kFloat) : exp_avg_[i];
    at::Tensor v = narrow ? exp_avg_sq_[i].to(at::kFloat) : exp_avg_sq_[i];
    AdamWUpdate(p32, g, m, v, lr, options_, step_);
    if (narrow) {
      exp_avg_[i].copy_(m);
      exp_avg_sq_[i].copy_(v);
    }
    if (!p32.is_same(p)) p.copy_(p32);
  }
}

void AdamW::ZeroGrad() {
  for (NamedTensor& p : params_) p.tensor.mutable_grad() = at::Tensor();
}

std::vector<NamedTensor> AdamW::State() const {
  std::vector<NamedTensor> state = {{"step", at::tensor(step_, at::kLong).reshape({})}};
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!owned_[i]) continue;
    state.push_back({params_[i].name + ".exp_avg", exp_avg_[i]});
    state.push_back({params_[i].name + ".exp_avg_sq", exp_avg_sq_[i]});
  }
  return state;
}

absl::Status AdamW::LoadState(const std::vector<NamedTensor>& state) {
  std::map<std::string, at::Tensor> by_name;
  for (const NamedTensor& nt : state) by_name[nt.name] = nt.tensor;
  auto step = by_name.find("step");
  if (step == by_name.end() || step->second.numel() != 1) {
    return absl::InvalidArgumentError("optimizer state has no 'step'; the checkpoint is incomplete");
  }
  std::vector<at::Tensor> m(params_.size()), v(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!owned_[i]) continue;
    for (auto [suffix, out] : {std::pair{".exp_avg", &m[i]}, {".exp_avg_sq", &v[i]}}) {
      auto it = by_name.find(params_[i].name + suffix);
      if (it == by_name.end() || it->second.sizes() != params_[i].tensor.sizes()) {
        return absl::InvalidArgumentError(absl::StrCat("optimizer state for '", params_[i].name, suffix,
                                                       "' is missing or has the wrong shape; the checkpoint does not "
                                                       "belong to this run"));
      }
      *out = it->second.to(params_[i].tensor.device(), options_.moment_dtype).clone();
    }
  }
  exp_avg_ = std::move(m);
  exp_avg_sq_ = std::move(v);
  step_ = step->second.item<int64_t>();
  return absl::OkStatus();
}

double ClipGradNorm(const std::vector<NamedTensor>& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> squares;
  for (const NamedTensor& p : params) {
    if (p.tensor.grad().defined()) squares.push_back(p.tensor.grad().to(at::kFloat).pow(2).sum());
  }
  if (squares.empty()) return 0.0;
  const double norm = std::sqrt(at::stack(squares).sum().item<double>());
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const NamedTensor& p : params) {
      if (p.tensor.grad().defined()) p.tensor.mutable_grad().mul_(scale);
    }
  }
  return norm;
}

}  // namespace flexfed
