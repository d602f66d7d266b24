#include "common/model/generation.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace flexfed {

int64_t SampleToken(const at::Tensor& logits, const GenerateOptions& options, at::Generator& generator) {
  if (options.temperature <= 0.0) return logits.argmax().item<int64_t>();
  at::Tensor scaled = logits.to(at::kFloat) / options.temperature;
  const int64_t vocab = scaled.size(0);
  if (options.top_k > 0 && options.top_k < vocab) {
    at::Tensor kth = std::get<0>(at::topk(scaled, options.top_k)).select(0, options.top_k - 1);
    scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<float>::infinity());
  }
  at::Tensor probs = at::softmax(scaled, 0);
  if (options.top_p < 1.0) {
    auto [sorted, order] = at::sort(probs, /*dim=*/0, /*descending=*/true);
    // Keep a token when the probability before it is still below top_p (the first always stays).
    at::Tensor before = sorted.cumsum(0) - sorted;
    at::Tensor drop = before >= options.top_p;
    probs = probs.index_put({order.masked_select(drop)}, at::zeros({}, probs.options()));
  }
  return at::multinomial(probs, 1, /*replacement=*/false, generator).item<int64_t>();
}

absl::StatusOr<GenerateResult> Generate(const FlexOlmoModel& model, const Tokenizer& tokenizer,
                                        const std::vector<int32_t>& prompt, const GenerateOptions& options,
                                        const Routing& routing, const std::function<void(int32_t)>& on_token) {
  const ModelConfig& c = model.config();
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty; give some text to continue");
  const int64_t total = static_cast<int64_t>(prompt.size()) + options.max_new_tokens;
  if (total > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("prompt (", prompt.size(), " tokens) + --max-new-tokens ", options.max_new_tokens,
                                                   " exceeds the model's ", c.max_position_embeddings, " positions"));
  }
  if (options.top_p <= 0.0 || options.top_p > 1.0) return absl::InvalidArgumentError("--top-p must be in (0, 1]");
  if (options.temperature < 0.0) return absl::InvalidArgumentError("--temperature must be ≥ 0 (0 = greedy)");
  c10::InferenceMode inference;
  at::Generator generator = at::detail::createCPUGenerator(options.seed);
  KvCache cache = model.NewCache(1, total);
  at::Tensor ids = at::tensor(std::vector<int64_t>(prompt.begin(), prompt.end()), at::kLong).unsqueeze(0).to(model.device());
  at::Tensor never = at::zeros({c.vocab_size}, at::kFloat);
  for (int32_t special : {tokenizer.bos_id(), tokenizer.pad_id()}) {
    if (special >= 0 && special < c.vocab_size) never[special] = -std::numeric_limits<float>::infinity();
  }
  GenerateResult result;
  at::Tensor logits = model.Forward(ids, routing, &cache).select(1, -1).squeeze(0).to(at::kCPU, at::kFloat);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    const int64_t next = SampleToken(logits + never, options, generator);
    if (options.stop_at_eos && next == tokenizer.eos_id()) {
      result.stopped_at_eos = true;
      break;
    }
    result.tokens.push_back(static_cast<int32_t>(next));
    if (on_token) on_token(static_cast<int32_t>(next));
    if (step + 1 == options.max_new_tokens) break;
    at::Tensor in = at::full({1, 1}, next, at::kLong).to(model.device());
    logits = model.Forward(in, routing, &cache).select(1, -1).squeeze(0).to(at::kCPU, at::kFloat);
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace flexfed
