#include "common/model/moe_dispatch.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "common/model/autocast.h"
#include "kernels/moe_ops.h"

#if FLEXFED_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/moe_align.cuh"
#include "kernels/moe_combine.cuh"
#include "kernels/moe_router.cuh"
#include "kernels/swiglu.cuh"
#endif

namespace flexfed {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace k = kernels;

// Runs kernels::Op on `like`'s device: the CUDA kernel on the current stream for a CUDA tensor,
// the reference for a CPU one.
#if FLEXFED_WITH_CUDA
#define FLEXFED_RUN_OP(Op, args, like)                                                      \
  do {                                                                                      \
    if ((like).is_cuda()) {                                                                 \
      const c10::cuda::CUDAGuard flexfed_guard((like).device());                            \
      k::Op((args), c10::cuda::getCurrentCUDAStream((like).device().index()).stream());    \
    } else {                                                                                \
      k::Op##Reference(args);                                                               \
    }                                                                                       \
  } while (0)
#else
#define FLEXFED_RUN_OP(Op, args, like)                                                                    \
  do {                                                                                                    \
    TORCH_CHECK(!(like).is_cuda(), "FlexFed was built without its CUDA kernels: rebuild with a CUDA "    \
                "LibTorch and -DFLEXFED_CUDA=ON (docs/GPU.md)");                                          \
    k::Op##Reference(args);                                                                               \
  } while (0)
#endif

k::DType KernelType(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return k::DType::kF32;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "MoE dispatch: hidden states must be fp32 or bf16, got ",
              t.scalar_type());
  return k::DType::kBF16;
}

// (1) Router: softmax with the bias and the opt-out mask, top-k. Inputs: raw logits [N, E] fp32,
// bias [E] fp32 (zeros when the model has none), allowed [E] uint8. Outputs: logits [N, E] fp32,
// weights [N, K] fp32, indices [N, K] int32 (not differentiable).
struct RouterFunction : torch::autograd::Function<RouterFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& raw, const at::Tensor& bias,
                               const at::Tensor& allowed, int64_t top_k, bool normalize) {
    const int64_t n = raw.size(0), e = raw.size(1);
    at::Tensor logits = at::empty_like(raw);
    at::Tensor weights = at::empty({n, top_k}, raw.options());
    at::Tensor indices = at::empty({n, top_k}, raw.options().dtype(at::kInt));
    k::RouterArgs a{raw.data_ptr<float>(),    bias.data_ptr<float>(),    allowed.data_ptr<uint8_t>(),
                    logits.data_ptr<float>(), weights.data_ptr<float>(), indices.data_ptr<int32_t>(),
                    n,                        static_cast<int>(e),       static_cast<int>(top_k),
                    normalize};
    FLEXFED_RUN_OP(Router, a, raw);
    ctx->save_for_backward({logits, weights, indices, bias});
    ctx->saved_data["normalize"] = normalize;
    ctx->mark_non_differentiable({indices});
    ctx->set_materialize_grads(false);  // an unused logits output (no z-loss) stays undefined
    return {logits, weights, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &weights = saved[1], &indices = saved[2], &bias = saved[3];
    const int64_t n = logits.size(0), e = logits.size(1), top_k = weights.size(1);
    at::Tensor grad_logits = at::empty_like(logits);
    if (grads[1].defined()) {
      const at::Tensor grad_weights = grads[1].to(at::kFloat).contiguous();
      k::RouterBackwardArgs a{logits.data_ptr<float>(),       indices.data_ptr<int32_t>(),
                              weights.data_ptr<float>(),      grad_weights.data_ptr<float>(),
                              grad_logits.data_ptr<float>(),  n,
                              static_cast<int>(e),            static_cast<int>(top_k),
                              ctx->saved_data["normalize"].toBool()};
      FLEXFED_RUN_OP(RouterBackward, a, logits);
    } else {
      grad_logits.zero_();
    }
    if (grads[0].defined()) grad_logits = grad_logits + grads[0];  // e.g. the z-loss's
    at::Tensor grad_bias;
    if (ctx->needs_input_grad(1)) {
      // logits[:, e] += min(b_e, 0) for e ≥ 1: the gradient passes where b_e ≤ 0 (as clamp_max's).
      at::Tensor pass = (bias <= 0).to(at::kFloat);
      pass.narrow(0, 0, 1).zero_();
      grad_bias = grad_logits.sum(0) * pass;
    }
    return {grad_logits, grad_bias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// (2) The routing plan: which position each slot takes (no gradient).
struct Plan {
  at::Tensor sorted_slot;          // [M] int32
  at::Tensor slot_position;        // [M] int32
  std::vector<int64_t> offsets;    // [E + 1] on the host: the experts' slices
};

// `every_expert`: each token chose every expert (top-k of k, none excluded), so expert e's slice is
// [e·N, (e+1)·N) and the host knows it without reading the counts back — no device→host copy, so a
// GPU step keeps running ahead of the host (the owner's expert training, top-2 of 2, is this case).
Plan Align(const at::Tensor& indices, int64_t experts, bool every_expert) {
  const int64_t m = indices.numel();
  const at::TensorOptions int32 = indices.options().dtype(at::kInt);
  at::Tensor counts = at::empty({experts}, int32), offsets = at::empty({experts + 1}, int32);
  Plan plan{at::empty({m}, int32), at::empty({m}, int32), {}};
  at::Tensor workspace;
#if FLEXFED_WITH_CUDA
  if (indices.is_cuda()) {
    workspace = at::empty({static_cast<int64_t>(k::AlignWorkspaceBytes(m, static_cast<int>(experts)))},
                          indices.options().dtype(at::kByte));
  }
#endif
  k::AlignArgs a{indices.data_ptr<int32_t>(),
                 counts.data_ptr<int32_t>(),
                 offsets.data_ptr<int32_t>(),
                 plan.sorted_slot.data_ptr<int32_t>(),
                 plan.slot_position.data_ptr<int32_t>(),
                 workspace.defined() ? workspace.data_ptr() : nullptr,
                 m,
                 static_cast<int>(experts)};
  FLEXFED_RUN_OP(Align, a, indices);
  if (every_expert) {
    const int64_t tokens = indices.size(0);
    for (int64_t e = 0; e <= experts; ++e) plan.offsets.push_back(e * tokens);
    return plan;
  }
  const at::Tensor host = offsets.to(at::kCPU).to(at::kLong);  // the one device→host copy per layer
  plan.offsets.assign(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + experts + 1);
  return plan;
}

// Gather: rows[p] = x[sorted_slot[p] / K]; backward: the gather's adjoint.
struct GatherFunction : torch::autograd::Function<GatherFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& sorted_slot,
                            const at::Tensor& slot_position, int64_t top_k) {
    const int64_t m = sorted_slot.numel(), h = x.size(1);
    at::Tensor rows = at::empty({m, h}, x.options());
    k::GatherArgs a{x.data_ptr(), sorted_slot.data_ptr<int32_t>(), rows.data_ptr(), m, h, static_cast<int>(top_k),
                    KernelType(x)};
    FLEXFED_RUN_OP(Gather, a, x);
    ctx->save_for_backward({slot_position});
    ctx->saved_data["tokens"] = x.size(0);
    ctx->saved_data["top_k"] = top_k;
    return rows;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor slot_position = ctx->get_saved_variables()[0];
    const at::Tensor grad_rows = grads[0].contiguous();
    const int64_t n = ctx->saved_data["tokens"].toInt(), h = grad_rows.size(1);
    at::Tensor grad_x = at::empty({n, h}, grad_rows.options());
    k::GatherBackwardArgs a{grad_rows.data_ptr(), slot_position.data_ptr<int32_t>(), grad_x.data_ptr(), n, h,
                            static_cast<int>(ctx->saved_data["top_k"].toInt()), KernelType(grad_rows)};
    FLEXFED_RUN_OP(GatherBackward, a, grad_rows);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void SwiGluInto(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  k::SwiGluArgs a{gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), KernelType(gate)};
  FLEXFED_RUN_OP(SwiGlu, a, gate);
}

// The experts' FFNs on their slices: ys[slice e] = down_e(silu(gate_e · x) * (up_e · x)).
// Inputs: rows [M, H] in the compute dtype, the slices' offsets (host), and the weights as one list
// (gate_0, up_0, down_0, gate_1, ...) in any dtype: they are cast to the compute dtype here and
// their gradients cast back. Saves the gate and up products [M, F] for the backward.
// `shared`: every token chose every expert, so each slice's rows are the tokens themselves in order:
// `rows` is then x [N, H] (not gathered E times) and every slice reads all of it; the rows' gradient
// sums the experts' contributions.
struct ExpertsFunction : torch::autograd::Function<ExpertsFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& rows, std::vector<int64_t> offsets,
                            bool shared, at::TensorList weights) {
    const int64_t h = rows.size(1), experts = static_cast<int64_t>(weights.size()) / 3;
    const int64_t m = offsets.back();
    const int64_t f = weights[0].size(0);
    TORCH_CHECK(shared ? m == experts * rows.size(0) : m == rows.size(0), "MoE dispatch: ", rows.size(0),
                " rows for ", m, " routed slots");
    at::Tensor gate = at::empty({m, f}, rows.options()), up = at::empty({m, f}, rows.options());
    at::Tensor ys = at::empty({m, h}, rows.options());
    std::vector<at::Tensor> cast;
    for (const at::Tensor& w : weights) cast.push_back(w.to(rows.scalar_type()));
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t begin = offsets[e], count = offsets[e + 1] - offsets[e];
      if (count == 0) continue;
      TORCH_CHECK(cast[3 * e].size(0) == f, "MoE dispatch: experts have different FFN widths");
      const at::Tensor xs = shared ? rows : rows.narrow(0, begin, count);
      at::Tensor g = gate.narrow(0, begin, count), u = up.narrow(0, begin, count);
      at::mm_out(g, xs, cast[3 * e].t());
      at::mm_out(u, xs, cast[3 * e + 1].t());
      at::Tensor act = at::empty({count, f}, rows.options());
      SwiGluInto(g, u, act);
      at::Tensor y = ys.narrow(0, begin, count);
      at::mm_out(y, act, cast[3 * e + 2].t());
    }
    std::vector<at::Tensor> saved = {rows, gate, up};
    saved.insert(saved.end(), cast.begin(), cast.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["offsets"] = offsets;
    ctx->saved_data["shared"] = shared;
    std::vector<int64_t> dtypes;
    for (const at::Tensor& w : weights) dtypes.push_back(static_cast<int64_t>(w.scalar_type()));
    ctx->saved_data["dtypes"] = dtypes;
    return ys;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &rows = saved[0], &gate = saved[1], &up = saved[2];
    const std::vector<int64_t> offsets = ctx->saved_data["offsets"].toIntVector();
    const bool shared = ctx->saved_data["shared"].toBool();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    const int64_t experts = static_cast<int64_t>(dtypes.size()) / 3, f = gate.size(1);
    const at::Tensor grad_ys = grads[0].to(rows.scalar_type()).contiguous();
    const bool want_rows = ctx->needs_input_grad(0);
    at::Tensor grad_rows = want_rows ? at::empty_like(rows) : at::Tensor();
    bool rows_written = false;  // shared rows: the first expert writes their gradient, the others add
    // Returned: one entry per forward argument (rows, offsets, shared, then each weight);
    // needs_input_grad counts tensors only (rows is 0, weight i is 1 + i).
    variable_list out(3 + dtypes.size());
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t begin = offsets[e], count = offsets[e + 1] - offsets[e];
      if (count == 0) continue;  // no tokens: zero gradient, left undefined
      const at::Tensor &w_gate = saved[3 + 3 * e], &w_up = saved[4 + 3 * e], &w_down = saved[5 + 3 * e];
      const at::Tensor xs = shared ? rows : rows.narrow(0, begin, count), dy = grad_ys.narrow(0, begin, count);
      const at::Tensor g = gate.narrow(0, begin, count), u = up.narrow(0, begin, count);
      auto weight_grad = [&](int64_t i, const at::Tensor& grad) {
        out[3 + i] = grad.to(static_cast<at::ScalarType>(dtypes[i]));
      };
      if (ctx->needs_input_grad(1 + 3 * e + 2)) {
        at::Tensor act = at::empty({count, f}, rows.options());
        SwiGluInto(g, u, act);
        weight_grad(3 * e + 2, dy.t().mm(act));
      }
      const at::Tensor d_act = dy.mm(w_down);  // [count, F]
      at::Tensor d_gate = at::empty_like(d_act), d_up = at::empty_like(d_act);
      k::SwiGluBackwardArgs a{d_act.data_ptr(), g.data_ptr(),  u.data_ptr(), d_gate.data_ptr(),
                              d_up.data_ptr(),  d_act.numel(), KernelType(d_act)};
      FLEXFED_RUN_OP(SwiGluBackward, a, d_act);
      if (want_rows) {
        at::Tensor dx = shared ? grad_rows : grad_rows.narrow(0, begin, count);
        if (shared && rows_written) {
          dx.addmm_(d_gate, w_gate);
        } else {
          at::mm_out(dx, d_gate, w_gate);
        }
        dx.addmm_(d_up, w_up);
        rows_written = true;
      }
      if (ctx->needs_input_grad(1 + 3 * e)) weight_grad(3 * e, d_gate.t().mm(xs));
      if (ctx->needs_input_grad(1 + 3 * e + 1)) weight_grad(3 * e + 1, d_up.t().mm(xs));
    }
    out[0] = grad_rows;
    return out;
  }
};

// Combine: out[n] = Σ_j weights[n, j] · ys[position of (n, j)]; backward into ys and the weights.
struct CombineFunction : torch::autograd::Function<CombineFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& ys, const at::Tensor& weights,
                            const at::Tensor& sorted_slot, const at::Tensor& slot_position) {
    const int64_t n = weights.size(0), top_k = weights.size(1), h = ys.size(1);
    at::Tensor out = at::empty({n, h}, ys.options());
    k::CombineArgs a{ys.data_ptr(), weights.data_ptr<float>(), slot_position.data_ptr<int32_t>(), out.data_ptr(), n, h,
                     static_cast<int>(top_k), KernelType(ys)};
    FLEXFED_RUN_OP(Combine, a, ys);
    ctx->save_for_backward({ys, weights, sorted_slot});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &ys = saved[0], &weights = saved[1], &sorted_slot = saved[2];
    const at::Tensor grad_out = grads[0].to(ys.scalar_type()).contiguous();
    at::Tensor grad_ys = at::empty_like(ys), grad_weights = at::empty_like(weights);
    k::CombineBackwardArgs a{grad_out.data_ptr(),
                             ys.data_ptr(),
                             weights.data_ptr<float>(),
                             sorted_slot.data_ptr<int32_t>(),
                             grad_ys.data_ptr(),
                             grad_weights.data_ptr<float>(),
                             ys.size(0),
                             ys.size(1),
                             static_cast<int>(weights.size(1)),
                             KernelType(ys)};
    FLEXFED_RUN_OP(CombineBackward, a, ys);
    return {grad_ys, grad_weights, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool CudaKernelsBuilt() { return FLEXFED_WITH_CUDA != 0; }

bool UseDispatchMoe(const at::Device& device) {
  // Read at each call (once per MoE layer's forward; the variable rarely changes, but a test that
  // sets it must be obeyed from then on).
  const char* v = std::getenv("FLEXFED_MOE");
  if (v != nullptr && std::strcmp(v, "libtorch") == 0) return false;
  if (v != nullptr && std::strcmp(v, "dispatch") == 0) return !device.is_cuda() || CudaKernelsBuilt();
  return CudaKernelsBuilt() && device.is_cuda();
}

DispatchMoeOutput DispatchMoe(const at::Tensor& x, const at::Tensor& router, const at::Tensor& bias,
                              const at::Tensor& mask, int64_t top_k, bool norm_topk_prob,
                              const std::vector<ExpertWeights>& experts) {
  TORCH_CHECK(x.dim() == 2, "DispatchMoe: x must be [tokens, hidden], got ", x.sizes());
  const int64_t num_experts = router.size(0);
  TORCH_CHECK(static_cast<int64_t>(experts.size()) == num_experts, "DispatchMoe: router has ", num_experts,
              " rows for ", experts.size(), " experts");
  const at::ScalarType compute = AutocastDtype(x.device().type()).value_or(x.scalar_type());

  const at::Tensor raw = RouterLogits(x, router);
  const at::TensorOptions f32 = raw.options();
  const at::Tensor b = bias.defined() ? bias.to(at::kFloat).contiguous() : at::zeros({num_experts}, f32);
  const at::Tensor allowed = mask.defined() ? (mask == 0).to(at::kByte).contiguous()
                                            : at::ones({num_experts}, f32.dtype(at::kByte));
  const variable_list routed = RouterFunction::apply(raw, b, allowed, top_k, norm_topk_prob);
  const at::Tensor &logits = routed[0], &weights = routed[1], &indices = routed[2];

  // Every token to every expert (the owner's training, top-2 of 2): each expert's slice is the tokens
  // in order, so the experts read x itself — no gather, and one copy kept for the backward, not E.
  const bool every_expert = top_k == num_experts && !mask.defined();
  const Plan plan = Align(indices, num_experts, every_expert);
  const at::Tensor xc = x.to(compute).contiguous();
  const at::Tensor rows =
      every_expert ? xc : GatherFunction::apply(xc, plan.sorted_slot, plan.slot_position, top_k);
  std::vector<at::Tensor> w;
  for (const ExpertWeights& e : experts) {
    w.push_back(e.gate_proj);
    w.push_back(e.up_proj);
    w.push_back(e.down_proj);
  }
  const at::Tensor ys = ExpertsFunction::apply(rows, plan.offsets, every_expert, at::TensorList(w));
  const at::Tensor out = CombineFunction::apply(ys, weights, plan.sorted_slot, plan.slot_position);
  return {out.to(x.scalar_type()), logits, indices.to(at::kLong)};
}

}  // namespace flexfed
