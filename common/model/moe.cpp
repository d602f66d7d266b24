#include "common/model/moe.h"

#include "common/model/autocast.h"
#include "common/model/layers.h"

namespace flexfed {

at::Tensor RouterLogits(const at::Tensor& x, const at::Tensor& router) {
  const NoAutocast fp32;
  return at::linear(x.to(at::kFloat), router.to(at::kFloat));
}

RouterOutput Route(const at::Tensor& x, const at::Tensor& router, const at::Tensor& bias, const at::Tensor& mask,
                   int64_t top_k, bool norm_topk_prob) {
  const int64_t num_experts = router.size(0);
  at::Tensor logits = RouterLogits(x, router);  // [N, E]
  if (bias.defined() && num_experts > 1) {
    // The public expert (0) takes no bias; the others min(b_e, 0).
    at::Tensor b = bias.to(at::kFloat);
    logits = logits + at::cat({at::zeros({1}, b.options()), b.narrow(0, 1, num_experts - 1).clamp_max(0)});
  }
  if (mask.defined()) logits = logits + mask;
  at::Tensor probs = at::softmax(logits, -1);  // excluded experts get exactly 0
  auto [weights, indices] = at::topk(probs, top_k, -1);
  if (norm_topk_prob) weights = weights / weights.sum(-1, /*keepdim=*/true);
  return {logits, weights, indices};
}

at::Tensor SwiGluRecorded(const at::Tensor& x, const ExpertWeights& w, FfnActivations* record) {
  record->x = x;
  record->a = at::linear(x, w.gate_proj);
  record->b = at::linear(x, w.up_proj);
  record->h = SiluMul(record->a, record->b);
  record->y = at::linear(record->h, w.down_proj);
  return record->y;
}

at::Tensor CombineExperts(const at::Tensor& x, const std::vector<ExpertWeights>& experts, const RouterOutput& route,
                          int64_t recorded_expert, FfnActivations* record) {
  const int64_t n = x.size(0), top_k = route.indices.size(1), num_experts = static_cast<int64_t>(experts.size());
  // Group (token, slot) pairs by expert on the host; each expert then runs on its own tokens.
  at::Tensor indices = route.indices.to(at::kCPU).contiguous();
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> tokens(num_experts), slots(num_experts);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t e = idx[i * top_k + j];
      TORCH_CHECK(e >= 0 && e < num_experts, "CombineExperts: expert index ", e, " out of range");
      tokens[e].push_back(i);
      slots[e].push_back(i * top_k + j);
    }
  }
  at::Tensor flat_weights = route.weights.reshape({-1});
  at::Tensor out;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (tokens[e].empty()) continue;
    const bool all_tokens = static_cast<int64_t>(tokens[e].size()) == n;
    at::Tensor token_index = at::tensor(tokens[e], at::kLong).to(x.device());
    at::Tensor slot_index = at::tensor(slots[e], at::kLong).to(x.device());
    at::Tensor xe = all_tokens ? x : x.index_select(0, token_index);
    at::Tensor we = flat_weights.index_select(0, slot_index).unsqueeze(1);  // [n_e, 1] fp32
    const ExpertWeights& w = experts[e];
    at::Tensor ffn;
    if (record != nullptr && e == recorded_expert) {
      record->rows = token_index;
      ffn = SwiGluRecorded(xe, w, record);
    } else {
      ffn = SwiGlu(xe, w.gate_proj, w.up_proj, w.down_proj);
    }
    // The product is formed in fp32 and cast back, as HF multiplies a bf16 output by fp32 weights.
    at::Tensor ye = (ffn.to(at::kFloat) * we).to(x.scalar_type());
    if (!out.defined()) {
      out = all_tokens ? ye : at::zeros_like(x).index_add(0, token_index, ye);
    } else {
      out = all_tokens ? out + ye : out.index_add(0, token_index, ye);
    }
  }
  return out;
}

}  // namespace flexfed
