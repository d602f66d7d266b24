#include <iostream>

#include "absl/strings/str_format.h"
#include "common/evaluation.h"
#include "common/model.h"
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
  SetThreads(o.threads);
  absl::StatusOr<FlexOlmoModel> model = FlexOlmoModel::Load(o.model);
  if (!model.ok()) return model.status();
  const ModelConfig& c = model->config();
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = TokenizerForModel(o.model, c.vocab_size);
  if (!tok.ok()) return tok.status();
  CorpusOptions copts;
  copts.text_field = o.text_field;
  absl::StatusOr<TokenCorpus> corpus = TokenCorpus::Build(o.data, **tok, copts, o.cache_dir);
  if (!corpus.ok()) return corpus.status();
  if (o.seq_len > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrFormat("--seq-len %d exceeds the model's %d positions", o.seq_len,
                                                      c.max_position_embeddings));
  }
  std::vector<int64_t> docs(corpus->num_documents());
  for (int64_t d = 0; d < corpus->num_documents(); ++d) docs[d] = d;
  PackedSequences packed(*corpus, docs, o.seq_len, (*tok)->eos_id());
  if (packed.size() == 0) {
    return absl::InvalidArgumentError(absl::StrFormat("the text makes no full sequence of %d tokens; lower --seq-len", o.seq_len));
  }
  std::vector<int64_t> indices;
  for (int64_t i = 0; i < packed.size() && (o.max_sequences == 0 || i < o.max_sequences); ++i) indices.push_back(i);
  absl::StatusOr<Routing> routing = Routing::FromLists(c.num_experts, o.exclude, o.allow);
  if (!routing.ok()) return routing.status();
  EvalResult r = Evaluate(*model, packed, indices, o.batch_size, **tok, *routing);
  if (o.json) {
    std::cout << nlohmann::json({{"model", o.model}, {"loss", r.loss}, {"bits_per_byte", r.bits_per_byte},
                                 {"tokens", r.tokens}, {"bytes", r.bytes}, {"sequences", indices.size()}})
                     .dump()
              << "\n";
  } else {
    std::cout << absl::StrFormat("loss %.4f nats/token, %.4f bits/byte over %d tokens (%d sequences of %d)\n", r.loss,
                                 r.bits_per_byte, r.tokens, indices.size(), o.seq_len);
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
