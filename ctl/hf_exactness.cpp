#include "ctl/hf_exactness.h"

#include "absl/strings/str_format.h"
#include "common/model/tokenizer.h"
#include "common/train/loss.h"

namespace flexfed::cli {

void AddHeldOutOptions(CLI::App* cmd, HeldOutText* held_out) {
  cmd->add_option("--held-out", held_out->paths,
                  "Held-out text (file, .jsonl or folder; repeatable) on which to measure how far transformers' and "
                  "vLLM's reading of the checkpoint is from FlexFed's when the experts carry router biases");
  cmd->add_option("--held-out-sequences", held_out->max_sequences, "At most this many held-out sequences")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--held-out-seq-len", held_out->seq_len, "Tokens per held-out sequence")->check(CLI::PositiveNumber);
}

absl::StatusOr<std::string> HfExactnessLine(const FlexOlmoModel& model, const std::string& model_dir,
                                            const HeldOutText& held_out) {
  if (model.layers().empty() || !model.layers()[0].router_bias.defined()) {
    return std::string("exact: transformers and vLLM compute from this checkpoint the model FlexFed computes (no router biases)");
  }
  const std::string head = absl::StrFormat(
      "not exact: transformers and vLLM cannot apply the owners' negative router biases (FlexFed keeps them in %s), "
      "so they compute this model without them",
      FlexOlmoModel::kExtrasFileName);
  if (held_out.paths.empty()) {
    return head + "; how far apart is not measured: pass --held-out TEXT, or --no-bias for an exact checkpoint";
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = TokenizerForModel(model_dir, model.config().vocab_size);
  if (!tokenizer.ok()) return tokenizer.status();
  absl::StatusOr<EvalText> text =
      LoadEvalText(held_out.paths, **tokenizer, held_out.seq_len, held_out.max_sequences, held_out.cache_dir);
  if (!text.ok()) return text.status();
  std::vector<LayerWeights> layers = model.layers();  // shares the tensors
  for (LayerWeights& lw : layers) lw.router_bias = at::Tensor();
  absl::StatusOr<FlexOlmoModel> without =
      FlexOlmoModel::Assemble(model.config(), model.embed_tokens(), std::move(layers), model.norm(), model.lm_head());
  if (!without.ok()) return without.status();
  const EvalResult ours = Evaluate(model, *text->packed, text->indices, 8, **tokenizer);
  const EvalResult theirs = Evaluate(*without, *text->packed, text->indices, 8, **tokenizer);
  return absl::StrFormat("%s: on the held-out text (%d tokens) they score %.4f bits/byte where FlexFed scores %.4f (%+.4f)",
                         head, ours.tokens, theirs.bits_per_byte, ours.bits_per_byte,
                         theirs.bits_per_byte - ours.bits_per_byte);
}

}  // namespace flexfed::cli
