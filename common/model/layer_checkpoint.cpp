#include "common/model/layer_checkpoint.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <vector>

#include "common/model/autocast.h"

namespace flexfed {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The layer's tensors that need a gradient, in a fixed order (the trained ones: an owner's
// expert and router, or every weight when pretraining).
std::vector<at::Tensor*> TrainedTensors(LayerWeights& w) {
  std::vector<at::Tensor*> all = {&w.q_proj, &w.k_proj, &w.v_proj, &w.o_proj, &w.q_norm, &w.k_norm,
                                  &w.post_attention_layernorm, &w.post_feedforward_layernorm, &w.router, &w.router_bias};
  for (ExpertWeights& e : w.experts) {
    for (at::Tensor* t : {&e.gate_proj, &e.up_proj, &e.down_proj}) all.push_back(t);
  }
  std::vector<at::Tensor*> trained;
  for (at::Tensor* t : all) {
    if (t->defined() && t->requires_grad()) trained.push_back(t);
  }
  return trained;
}

struct LayerCall {
  const FlexOlmoModel* model;
  int64_t layer;
  at::Tensor routing_mask;
  int64_t top_k;
};

struct LayerFunction : torch::autograd::Function<LayerFunction> {
  // Inputs: the layer's input and its trained tensors (so that their gradients flow back through
  // the graph that made them, e.g. a router composed of trained and frozen rows).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, at::TensorList trained, const LayerCall& call) {
    ForwardTrace trace;
    at::Tensor out;
    {
      // With a graph, freed at once: the operations the recomputation will run (without one, some
      // take other paths, e.g. RmsNorm's fused CPU loop) — so the backward sees this forward's values.
      // No cast cache: each bf16 copy of a trained matrix is dropped after its product instead of
      // being held to the end of the forward.
      at::AutoGradMode grad_on(true);
      NoAutocastCache no_cache;
      out = call.model->DecoderLayer(call.layer, call.model->layers()[call.layer], h.detach(), 0, nullptr,
                                     call.routing_mask, call.top_k, &trace).detach();
      for (at::Tensor& logits : trace.router_logits) logits = logits.detach();
    }
    std::vector<at::Tensor> saved = {h};
    saved.insert(saved.end(), trained.begin(), trained.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["model"] = reinterpret_cast<int64_t>(call.model);
    ctx->saved_data["layer"] = call.layer;
    ctx->saved_data["top_k"] = call.top_k;
    ctx->saved_data["mask"] = call.routing_mask;
    const std::optional<at::ScalarType> autocast = AutocastDtype(h.device().type());
    ctx->saved_data["autocast"] = autocast ? static_cast<int64_t>(*autocast) : int64_t{-1};
    if (trace.router_logits.empty()) return {out};
    ctx->mark_non_differentiable({trace.expert_indices[0]});
    return {out, trace.router_logits[0], trace.expert_indices[0]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const auto* model = reinterpret_cast<const FlexOlmoModel*>(ctx->saved_data["model"].toInt());
    const int64_t layer = ctx->saved_data["layer"].toInt();
    LayerWeights w = model->layers()[static_cast<size_t>(layer)];  // shares the tensors; stand-ins below
    std::vector<at::Tensor*> trained = TrainedTensors(w);
    TORCH_CHECK(trained.size() + 1 == saved.size(), "checkpointed layer ", layer, ": its trained tensors changed between forward and backward");
    // The recomputation's leaves: the saved input and tensors, detached, so that the gradients stop
    // here and the engine carries them on from this function's inputs.
    std::vector<at::Tensor> leaves;
    at::Tensor h = saved[0].detach();
    const bool want_h = ctx->needs_input_grad(0);
    if (want_h) {
      h.requires_grad_(true);
      leaves.push_back(h);
    }
    for (size_t i = 0; i < trained.size(); ++i) {
      *trained[i] = saved[i + 1].detach().requires_grad_(true);
      leaves.push_back(*trained[i]);
    }
    ForwardTrace trace;
    at::Tensor out;
    {
      at::AutoGradMode grad_on(true);
      std::optional<AutocastScope> autocast;
      const int64_t dtype = ctx->saved_data["autocast"].toInt();
      if (dtype >= 0) autocast.emplace(h.device().type(), static_cast<at::ScalarType>(dtype));
      // Uncached casts, as in the forward: `h` is a leaf here, and a cached bf16 copy of it would
      // sum its gradients from q, k and v in bf16 where the plain graph sums them in fp32.
      NoAutocastCache no_cache;
      out = model->DecoderLayer(layer, w, h, 0, nullptr, ctx->saved_data["mask"].toTensor(),
                                ctx->saved_data["top_k"].toInt(), &trace);
    }
    variable_list outputs = {out};
    variable_list grad_outputs = {grads[0].defined() ? grads[0] : at::zeros_like(out)};
    if (grads.size() > 1 && grads[1].defined() && !trace.router_logits.empty()) {
      outputs.push_back(trace.router_logits[0]);
      grad_outputs.push_back(grads[1]);
    }
    const variable_list got = torch::autograd::grad(outputs, leaves, grad_outputs, /*retain_graph=*/false,
                                                    /*create_graph=*/false, /*allow_unused=*/true);
    variable_list result;  // one per forward input: h, each trained tensor, the call (none)
    size_t next = 0;
    result.push_back(want_h ? got[next++] : at::Tensor());
    for (size_t i = 0; i < trained.size(); ++i) result.push_back(got[next++]);
    result.push_back(at::Tensor());
    return result;
  }
};

}  // namespace

CheckpointedLayerOutput CheckpointedLayer(const FlexOlmoModel& model, int64_t layer, const at::Tensor& h,
                                          const at::Tensor& routing_mask, int64_t top_k) {
  LayerWeights w = model.layers()[static_cast<size_t>(layer)];
  std::vector<at::Tensor> trained;
  for (at::Tensor* t : TrainedTensors(w)) trained.push_back(*t);
  const LayerCall call{&model, layer, routing_mask, top_k};
  variable_list out = LayerFunction::apply(h, at::TensorList(trained), call);
  CheckpointedLayerOutput result{out[0], {}, {}};
  if (out.size() > 1) {
    result.router_logits = out[1];
    result.expert_indices = out[2];
  }
  return result;
}

}  // namespace flexfed
