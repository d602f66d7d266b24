// Loss, bits per byte and routing statistics of a model on packed text (used by validation during
// training, the `eval` commands of both CLIs and the evaluation suite, evaluation/).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/train/data.h"
#include "common/model/model.h"
#include "common/model/tokenizer.h"

namespace flexfed {

struct EvalResult {
  double loss = 0;           // mean next-token cross-entropy, nats
  double bits_per_byte = 0;  // total NLL / ln 2 / UTF-8 bytes of the predicted tokens
  int64_t tokens = 0;
  int64_t bytes = 0;
};

// The score of every predicted token: what per-token baselines (BTM) and per-domain tables are
// computed from. Row s is sequence indices[s]; column t predicts its token t + 1.
struct TokenScores {
  at::Tensor nll;    // [S, T] float64, nats
  at::Tensor bytes;  // [S, T] int64, UTF-8 bytes of each predicted token
};

// How a MoE model routed the scored tokens: per layer and expert, the number of tokens whose
// highest-weighted expert it was, and the number of tokens that selected it among their top k.
struct RoutingStats {
  std::vector<std::vector<int64_t>> top1;      // [layer][expert]
  std::vector<std::vector<int64_t>> selected;  // [layer][expert]
  int64_t tokens = 0;
};

// Scores sequences `indices` of `data` in batches of `batch_size`, gradients off. With `stats`
// (MoE models only), also counts routing decisions.
TokenScores ScoreTokens(const FlexOlmoModel& model, const PackedSequences& data, const std::vector<int64_t>& indices,
                        int64_t batch_size, const Tokenizer& tokenizer, const Routing& routing = {},
                        RoutingStats* stats = nullptr);

EvalResult Summarize(const TokenScores& scores);

// ScoreTokens + Summarize.
EvalResult Evaluate(const FlexOlmoModel& model, const PackedSequences& data, const std::vector<int64_t>& indices,
                    int64_t batch_size, const Tokenizer& tokenizer, const Routing& routing = {});

// BTM (Li et al. 2022; docs/METHOD.md §5): an ensemble whose output probability is Σ_m w_m p_m, with
// per-sequence weights w = softmax(−NLL_prefix / tau) over the members. Causal: token t is mixed
// with weights from the tokens before it, up to the first `prefix` (uniform at t = 0). With
// `top_k` > 0, only the k highest-weighted members are mixed at each token, their weights
// renormalised (the FlexOlmo paper's BTM baseline uses top-2).
TokenScores EnsembleScores(const std::vector<TokenScores>& members, int64_t prefix, double tau, int64_t top_k = 0);

// Text files for evaluation, tokenized (through the token cache) and packed into sequences of
// `seq_len`: every document, in order, at most `max_sequences` sequences (0 = all).
struct EvalText {
  std::unique_ptr<PackedSequences> packed;
  std::vector<int64_t> indices;
};
absl::StatusOr<EvalText> LoadEvalText(const std::vector<std::string>& inputs, const Tokenizer& tokenizer,
                                      int64_t seq_len, int64_t max_sequences, const std::string& cache_dir,
                                      const std::string& text_field = "text");

}  // namespace flexfed
