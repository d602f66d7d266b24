#include <iostream>

#include "absl/strings/str_format.h"
#include "common/train/loss.h"
#include "common/model/model.h"
#include "owner_client/commands.h"
#include <nlohmann/json.hpp>

namespace flexfed::owner {
namespace {

struct Options {
  std::string model, cache_dir = DefaultTokenCacheDir(), text_field = "text";
  std::vector<std::string> data;
  int64_t seq_len = 256, batch_size = 8, max_sequences = 0;
  std::vector<int64_t> exclude, allow;
  int threads = 0;
  bool json = false;
};

absl::Status Run(const Options& o) {
  SetCpuThreads(o.threads);
  absl::StatusOr<FlexOlmoModel> model = FlexOlmoModel::Load(o.model);
  if (!model.ok()) return model.status();
  const ModelConfig& c = model->config();
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = TokenizerForModel(o.model, c.vocab_size);
  if (!tok.ok()) return tok.status();
  if (o.seq_len > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrFormat("--seq-len %d exceeds the model's %d positions", o.seq_len,
                                                      c.max_position_embeddings));
  }
  absl::StatusOr<EvalText> text = LoadEvalText(o.data, **tok, o.seq_len, o.max_sequences, o.cache_dir, o.text_field);
  if (!text.ok()) return text.status();
  absl::StatusOr<Routing> routing = Routing::FromLists(c.num_experts, o.exclude, o.allow);
  if (!routing.ok()) return routing.status();
  EvalResult r = Evaluate(*model, *text->packed, text->indices, o.batch_size, **tok, *routing);
  if (o.json) {
    std::cout << nlohmann::json({{"model", o.model}, {"loss", r.loss}, {"bits_per_byte", r.bits_per_byte},
                                 {"tokens", r.tokens}, {"bytes", r.bytes}, {"sequences", text->indices.size()}})
                     .dump()
              << "\n";
  } else {
    std::cout << absl::StrFormat("loss %.4f nats/token, %.4f bits/byte over %d tokens (%d sequences of %d)\n", r.loss,
                                 r.bits_per_byte, r.tokens, text->indices.size(), o.seq_len);
  }
  return absl::OkStatus();
}

}  // namespace

void AddEvalCommand(CLI::App& app) {
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("eval", "Validation loss and bits per byte of a model (anchor, two-expert, merged) on local text");
  cmd->add_option("model", o->model, "Model directory (HF checkpoint)")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--data", o->data, "Text files, .jsonl files or folders")->required();
  cmd->add_option("--seq-len", o->seq_len, "Tokens per sequence")->check(CLI::PositiveNumber);
  cmd->add_option("--batch-size", o->batch_size, "Sequences per batch")->check(CLI::PositiveNumber);
  cmd->add_option("--max-sequences", o->max_sequences, "Evaluate at most this many sequences (0 = all)");
  auto* exclude = cmd->add_option("--exclude", o->exclude, "Experts to opt out of");
  cmd->add_option("--allow", o->allow, "Only these experts")->excludes(exclude);
  cmd->add_option("--text-field", o->text_field, "JSONL field holding the text");
  cmd->add_option("--cache-dir", o->cache_dir, "Token cache folder");
  cmd->add_option("--threads", o->threads, "CPU threads (default: all cores)");
  cmd->add_flag("--json", o->json, "Print JSON");
  cmd->callback([o] { ExitOnError("eval", Run(*o)); });
}

}  // namespace flexfed::owner
