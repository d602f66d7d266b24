#include "common/train/cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

#include "common/model/autocast.h"

namespace flexfed {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// hidden and weight arrive in the compute dtype; the outputs and every reduction are fp32.
struct ChunkedCrossEntropyFunction : torch::autograd::Function<ChunkedCrossEntropyFunction> {
  // `grad_in_forward` (a frozen head, hidden needing a gradient): each chunk's (softmax − one-hot)·W
  // is formed while its logits are at hand and kept as G [N, H]; the backward only scales G's rows
  // by the incoming gradient — no second product with the head, no second pass over the logits.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& targets, int64_t chunk, bool grad_in_forward) {
    NoAutocast exact;  // the dtypes are chosen by the caller
    const int64_t n = hidden.size(0);
    at::Tensor nll = at::empty({n}, hidden.options().dtype(at::kFloat));
    at::Tensor lse = at::empty({n}, hidden.options().dtype(at::kFloat));
    at::Tensor grad_rows = grad_in_forward ? at::empty_like(hidden) : at::Tensor();
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t rows = std::min(chunk, n - start);
      const at::Tensor target = targets.narrow(0, start, rows).unsqueeze(1);
      at::Tensor logits = at::linear(hidden.narrow(0, start, rows), weight).to(at::kFloat);
      const at::Tensor l = at::logsumexp(logits, 1);
      lse.narrow(0, start, rows).copy_(l);
      nll.narrow(0, start, rows).copy_(l - logits.gather(1, target).squeeze(1));
      if (grad_in_forward) {
        logits.sub_(l.unsqueeze(1)).exp_();  // softmax, in place
        logits.scatter_add_(1, target, at::full({rows, 1}, -1.0f, logits.options()));
        at::Tensor out = grad_rows.narrow(0, start, rows);
        at::mm_out(out, logits.to(hidden.scalar_type()), weight);
      }
    }
    if (grad_in_forward) {
      ctx->save_for_backward({grad_rows});
    } else {
      ctx->save_for_backward({hidden, weight, targets, lse});
    }
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["grad_in_forward"] = grad_in_forward;
    return nll;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast exact;
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->saved_data["grad_in_forward"].toBool()) {
      const at::Tensor& grad_rows = saved[0];
      return {(grad_rows.to(at::kFloat) * grads[0].to(at::kFloat).unsqueeze(1)).to(grad_rows.scalar_type()), at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const at::Tensor &hidden = saved[0], &weight = saved[1], &targets = saved[2], &lse = saved[3];
    const int64_t chunk = ctx->saved_data["chunk"].toInt(), n = hidden.size(0);
    const at::Tensor g = grads[0].to(at::kFloat);
    const bool want_hidden = ctx->needs_input_grad(0), want_weight = ctx->needs_input_grad(1);
    at::Tensor grad_hidden = want_hidden ? at::empty_like(hidden) : at::Tensor();
    at::Tensor grad_weight = want_weight ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat)) : at::Tensor();
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t rows = std::min(chunk, n - start);
      const at::Tensor h = hidden.narrow(0, start, rows);
      // d nll / d logits = softmax − one-hot, scaled by the incoming gradient.
      at::Tensor d = at::linear(h, weight).to(at::kFloat).sub_(lse.narrow(0, start, rows).unsqueeze(1)).exp_();
      d.scatter_add_(1, targets.narrow(0, start, rows).unsqueeze(1), at::full({rows, 1}, -1.0f, d.options()));
      d.mul_(g.narrow(0, start, rows).unsqueeze(1));
      const at::Tensor dc = d.to(hidden.scalar_type());
      if (want_hidden) grad_hidden.narrow(0, start, rows).copy_(at::mm(dc, weight));
      if (want_weight) {
        // fp32 sums: in place when the operands are fp32; a bf16 chunk's product (fp32-accumulated
        // by the GEMM, as a bf16 linear's backward rounds it) added in fp32 otherwise.
        if (dc.scalar_type() == at::kFloat) {
          grad_weight.addmm_(dc.t(), h, /*beta=*/1, /*alpha=*/1);
        } else {
          grad_weight.add_(at::mm(dc.t(), h));
        }
      }
    }
    if (want_weight) grad_weight = grad_weight.to(weight.scalar_type());
    return {grad_hidden, grad_weight, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

int64_t DefaultLossChunk(int64_t vocab_size) {
  return std::max<int64_t>(64, (int64_t{128} << 20) / 4 / std::max<int64_t>(1, vocab_size));
}

at::Tensor ChunkedCrossEntropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               int64_t chunk_tokens) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), "ChunkedCrossEntropy: hidden ",
              hidden.sizes(), " and weight ", weight.sizes(), " do not match");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "ChunkedCrossEntropy: ", targets.numel(),
              " targets for ", hidden.size(0), " rows");
  const int64_t chunk = chunk_tokens > 0 ? chunk_tokens : DefaultLossChunk(weight.size(0));
  // The dtype the output head's product would run in here: autocast's, or the operands' own.
  const at::ScalarType compute = AutocastDtype(hidden.device().type()).value_or(at::promote_types(hidden.scalar_type(), weight.scalar_type()));
  const bool grad_in_forward = at::GradMode::is_enabled() && hidden.requires_grad() && !weight.requires_grad();
  return ChunkedCrossEntropyFunction::apply(hidden.to(compute), weight.to(compute), targets, chunk, grad_in_forward);
}

}  // namespace flexfed
