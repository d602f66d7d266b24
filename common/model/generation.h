// Text generation with the KV cache: greedy, or sampling with temperature, top-k and top-p
// (nucleus), reproducible from a seed. Used by `flexfedctl generate`.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/model.h"
#include "common/model/tokenizer.h"

namespace flexfed {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  double temperature = 0.0;  // 0 = greedy (argmax)
  int64_t top_k = 0;         // sample only among the k most likely tokens (0 = all)
  double top_p = 1.0;        // sample only among the smallest set with this much probability
  uint64_t seed = 0;
  bool stop_at_eos = true;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated, without the prompt (and without a final EOS)
  bool stopped_at_eos = false;
  double seconds = 0;           // after the prompt was processed
};

// Runs the prompt once through the model, then one token per step from the cache. `on_token` is
// called with each new token as it is chosen (for streaming). BOS and PAD are never generated.
absl::StatusOr<GenerateResult> Generate(const FlexOlmoModel& model, const Tokenizer& tokenizer,
                                        const std::vector<int32_t>& prompt, const GenerateOptions& options,
                                        const Routing& routing = {},
                                        const std::function<void(int32_t)>& on_token = nullptr);

// One choice from next-token logits [V] fp32 (exposed for tests).
int64_t SampleToken(const at::Tensor& logits, const GenerateOptions& options, at::Generator& generator);

}  // namespace flexfed
