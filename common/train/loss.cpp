#include "common/train/loss.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_format.h"

namespace flexfed {

TokenScores ScoreTokens(const FlexOlmoModel& model, const PackedSequences& data, const std::vector<int64_t>& indices,
                        int64_t batch_size, const Tokenizer& tokenizer, const Routing& routing, RoutingStats* stats) {
  c10::InferenceMode inference;
  const ModelConfig& c = model.config();
  const bool moe = c.is_moe() && stats != nullptr;
  if (moe && stats->top1.empty()) {
    stats->top1.assign(c.num_hidden_layers, std::vector<int64_t>(c.num_experts, 0));
    stats->selected.assign(c.num_hidden_layers, std::vector<int64_t>(c.num_experts, 0));
  }
  std::vector<at::Tensor> nll, bytes;
  for (size_t start = 0; start < indices.size(); start += batch_size) {
    const size_t end = std::min(indices.size(), start + static_cast<size_t>(batch_size));
    at::Tensor batch = data.Batch(std::vector<int64_t>(indices.begin() + start, indices.begin() + end));
    const int64_t b = batch.size(0), t = batch.size(1) - 1;
    at::Tensor inputs = batch.narrow(1, 0, t).to(model.device());
    at::Tensor targets = batch.narrow(1, 1, t).reshape({-1});
    ForwardTrace trace;
    at::Tensor logits = model.Forward(inputs, routing, nullptr, moe ? &trace : nullptr).reshape({-1, c.vocab_size}).to(at::kFloat);
    nll.push_back(at::cross_entropy_loss(logits, targets.to(logits.device()), {}, at::Reduction::None)
                      .to(at::kCPU, at::kDouble)
                      .reshape({b, t}));
    at::Tensor token_bytes = at::empty({b * t}, at::kLong);
    const int64_t* ids = targets.data_ptr<int64_t>();
    int64_t* out = token_bytes.data_ptr<int64_t>();
    for (int64_t i = 0; i < b * t; ++i) out[i] = tokenizer.TokenBytes(static_cast<int32_t>(ids[i]));
    bytes.push_back(token_bytes.reshape({b, t}));
    if (moe) {
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        at::Tensor chosen = trace.expert_indices[l].to(at::kCPU);  // [N, K], by descending weight
        at::Tensor top1 = at::bincount(chosen.select(1, 0), {}, c.num_experts);
        at::Tensor sel = at::bincount(chosen.reshape({-1}), {}, c.num_experts);
        for (int64_t e = 0; e < c.num_experts; ++e) {
          stats->top1[l][e] += top1[e].item<int64_t>();
          stats->selected[l][e] += sel[e].item<int64_t>();
        }
      }
      stats->tokens += b * t;
    }
  }
  if (nll.empty()) return {at::zeros({0, 0}, at::kDouble), at::zeros({0, 0}, at::kLong)};
  return {at::cat(nll), at::cat(bytes)};
}

EvalResult Summarize(const TokenScores& scores) {
  EvalResult r;
  r.tokens = scores.nll.numel();
  r.bytes = r.tokens > 0 ? scores.bytes.sum().item<int64_t>() : 0;
  const double nll = r.tokens > 0 ? scores.nll.sum().item<double>() : 0.0;
  r.loss = r.tokens > 0 ? nll / static_cast<double>(r.tokens) : 0.0;
  r.bits_per_byte = r.bytes > 0 ? nll / std::log(2.0) / static_cast<double>(r.bytes) : 0.0;
  return r;
}

EvalResult Evaluate(const FlexOlmoModel& model, const PackedSequences& data, const std::vector<int64_t>& indices,
                    int64_t batch_size, const Tokenizer& tokenizer, const Routing& routing) {
  return Summarize(ScoreTokens(model, data, indices, batch_size, tokenizer, routing));
}

TokenScores EnsembleScores(const std::vector<TokenScores>& members, int64_t prefix, double tau, int64_t top_k) {
  TORCH_CHECK(!members.empty() && tau > 0 && prefix >= 0 && top_k >= 0, "EnsembleScores: members, tau > 0, prefix >= 0, top_k >= 0");
  at::Tensor nll = at::stack([&] {
    std::vector<at::Tensor> v;
    for (const TokenScores& m : members) v.push_back(m.nll);
    return v;
  }());  // [M, S, T]
  const int64_t t = nll.size(2);
  // NLL of the tokens before each position, counting at most the first `prefix` tokens.
  at::Tensor before = nll.cumsum(2) - nll;
  if (prefix < t) before.narrow(2, prefix, t - prefix).copy_(before.narrow(2, prefix, 1).expand({-1, -1, t - prefix}));
  at::Tensor log_w = at::log_softmax(-before / tau, 0);
  if (top_k > 0 && top_k < static_cast<int64_t>(members.size())) {
    // Keep the k best members (ties broken by order), then renormalise their weights.
    const at::Tensor kept = at::full_like(log_w, -std::numeric_limits<double>::infinity())
                                .scatter(0, std::get<1>(log_w.topk(top_k, 0)), 0.0);
    log_w = at::log_softmax(log_w + kept, 0);
  }
  return {-at::logsumexp(log_w - nll, 0), members.front().bytes};
}

absl::StatusOr<EvalText> LoadEvalText(const std::vector<std::string>& inputs, const Tokenizer& tokenizer,
                                      int64_t seq_len, int64_t max_sequences, const std::string& cache_dir,
                                      const std::string& text_field) {
  CorpusOptions options;
  options.text_field = text_field;
  absl::StatusOr<TokenCorpus> corpus = TokenCorpus::Build(inputs, tokenizer, options, cache_dir);
  if (!corpus.ok()) return corpus.status();
  std::vector<int64_t> docs(corpus->num_documents());
  for (int64_t d = 0; d < corpus->num_documents(); ++d) docs[d] = d;
  EvalText out;
  out.packed = std::make_unique<PackedSequences>(*std::move(corpus), docs, seq_len, tokenizer.eos_id());
  if (out.packed->size() == 0) {
    return absl::InvalidArgumentError(absl::StrFormat("the text makes no full sequence of %d tokens; lower --seq-len", seq_len));
  }
  for (int64_t i = 0; i < out.packed->size() && (max_sequences == 0 || i < max_sequences); ++i) out.indices.push_back(i);
  return out;
}

}  // namespace flexfed
