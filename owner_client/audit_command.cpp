// flexfed-owner audit: the extraction test on your own data, before anything leaves
// (common/train/extraction_audit.h, docs/PRIVACY.md).
#include <algorithm>
#include <atomic>
#include <csignal>
#include <filesystem>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/core/anchor_manifest.h"
#include "common/core/processes.h"
#include "common/model/model.h"
#include "common/train/extraction_audit.h"
#include "owner_client/commands.h"
#include <nlohmann/json.hpp>

namespace flexfed::owner {
namespace {

namespace fs = std::filesystem;


struct Options {
  std::string run, model, out, cache_dir = DefaultTokenCacheDir(), text_field = "text";
  std::vector<std::string> data;
  ExtractionAuditOptions audit;
  std::vector<int64_t> exclude, allow;
  int threads = 0;
  bool json = false, plain = false;
};

// Text cut to `n` bytes (at a UTF-8 boundary) with control characters shown, for one-line display.
std::string Shorten(const std::string& text, size_t n) {
  std::string out;
  for (size_t i = 0; i < text.size() && out.size() < n; ++i) {
    const char c = text[i];
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else {
      out += c;
    }
  }
  while (!out.empty() && (static_cast<unsigned char>(out.back()) & 0xC0) == 0x80) out.pop_back();
  if (!out.empty() && (static_cast<unsigned char>(out.back()) & 0x80)) out.pop_back();
  return out.size() < text.size() ? out + "…" : out;
}

absl::Status Run(const Options& o) {
  if (o.run.empty() == o.model.empty()) return absl::InvalidArgumentError("give --run RUN (audits RUN/model) or --model DIR");
  const std::string model_dir = o.model.empty() ? (fs::path(o.run) / "model").string() : o.model;
  std::string out_dir = o.out;
  if (out_dir.empty()) {
    if (o.run.empty()) return absl::InvalidArgumentError("give --out DIR for the audit's results (with --model)");
    out_dir = (fs::path(o.run) / "audit").string();
  }
  if (absl::Status s = o.audit.Validate(); !s.ok()) return s;
  SetCpuThreads(o.threads);
  // The model's identity: the digest of its directory's files, as an anchor's id is made.
  absl::StatusOr<std::string> model_id = AnchorId(model_dir);
  if (!model_id.ok()) return model_id.status();
  absl::StatusOr<FlexOlmoModel> model = FlexOlmoModel::Load(model_dir);
  if (!model.ok()) return model.status();
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = TokenizerForModel(model_dir, model->config().vocab_size);
  if (!tok.ok()) return tok.status();
  absl::StatusOr<Routing> routing = Routing::FromLists(model->config().num_experts, o.exclude, o.allow);
  if (!routing.ok()) return routing.status();
  absl::StatusOr<TokenCorpus> corpus = TokenCorpus::Build(o.data, **tok, CorpusOptions{o.text_field}, o.cache_dir);
  if (!corpus.ok()) return corpus.status();

  const std::atomic<bool>& stop = InstallStopSignals();
  ProgressReporter progress(stderr, o.plain || o.json);
  absl::StatusOr<ExtractionReport> report =
      RunExtractionAudit(*model, *model_id, **tok, *corpus, o.audit, *routing, out_dir, &stop, &progress);
  if (!report.ok()) return report.status();
  if (!report->complete && stop.load()) {
    std::cerr << "stopped after " << report->audited << " documents (results kept in " << out_dir
              << "); run the same command again to continue\n";
    std::exit(128 + StopSignal());
  }
  if (o.json) {
    nlohmann::json j = report->SummaryJson(o.audit);
    j["model"] = model_dir;
    j["results"] = out_dir;
    j["most_similar"] = nlohmann::json::array();
    for (const ExtractionSample& s : report->most_similar) {
      j["most_similar"].push_back({{"document", s.document}, {"similarity", s.similarity}, {"extracted", s.extracted},
                                   {"prefix", s.prefix}, {"truth", s.truth}, {"generated", s.generated}});
    }
    std::cout << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";  // texts cut mid-character
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat(
      "extracted %d of %d documents: %.2f%% (95%% CI %.2f–%.2f%%), mean similarity %.3f; threshold %.2f, prefix %d "
      "tokens, %d compared\n",
      report->extracted, report->audited, 100 * report->rate, 100 * report->interval.low, 100 * report->interval.high,
      report->mean_similarity, o.audit.threshold, o.audit.prefix_tokens, o.audit.continuation_tokens);
  if (!report->most_similar.empty()) {
    std::cout << "most similar (for your eyes only: this text is your data and stays here):\n";
    for (const ExtractionSample& s : report->most_similar) {
      std::cout << absl::StrFormat("  document %d, similarity %.3f%s\n    prefix:    %s\n    truth:     %s\n    generated: %s\n",
                                   s.document, s.similarity, s.extracted ? " (extracted)" : "", Shorten(s.prefix, 100),
                                   Shorten(s.truth, 160), Shorten(s.generated, 160));
    }
  }
  std::cout << "results: " << out_dir << "/" << kExtractionReportFile
            << (o.run.empty() ? "" : "; `export --run` records the rate in the module's metadata") << "\n";
  return absl::OkStatus();
}

}  // namespace

void AddAuditCommand(CLI::App& app) {
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "audit", "Extraction test on your own data: how much of it a model reproduces from a prefix (local only)");
  cmd->footer(
      "Samples documents, prompts with each one's first tokens, generates greedily and counts a document as\n"
      "extracted when the normalised Levenshtein similarity to its true continuation reaches the threshold.\n"
      "Interrupt any time; the same command continues. Exit codes: 0 done, 1 failed, 2 usage, 130/143 stopped.");
  auto* run = cmd->add_option("--run", o->run, "Training run: audits RUN/model, results in RUN/audit")->check(CLI::ExistingDirectory);
  cmd->add_option("--model", o->model, "Any model directory instead (two-expert, merged release, dense)")
      ->check(CLI::ExistingDirectory)
      ->excludes(run);
  cmd->add_option("--out", o->out, "Folder for the results (default with --run: RUN/audit)");
  cmd->add_option("--data", o->data, "Your training text: text files, .jsonl files or folders")->required();
  cmd->add_option("--samples", o->audit.samples, "Documents to audit")->capture_default_str();
  cmd->add_option("--prefix-tokens", o->audit.prefix_tokens, "Prompt length (paper: 32)")->capture_default_str();
  cmd->add_option("--continuation-tokens", o->audit.continuation_tokens, "Tokens generated and compared (paper: 256)")
      ->capture_default_str();
  cmd->add_option("--min-continuation-tokens", o->audit.min_continuation_tokens,
                  "Documents with fewer tokens after the prefix are not sampled")
      ->capture_default_str();
  cmd->add_option("--threshold", o->audit.threshold, "Similarity that counts as extracted (paper: 0.9)")->capture_default_str();
  cmd->add_option("--seed", o->audit.seed, "Which documents are sampled")->capture_default_str();
  cmd->add_option("--show", o->audit.show, "Most similar documents to print")->capture_default_str();
  auto* exclude = cmd->add_option("--exclude", o->exclude, "Experts to opt out of");
  cmd->add_option("--allow", o->allow, "Only these experts")->excludes(exclude);
  cmd->add_option("--text-field", o->text_field, "JSONL field holding the text");
  cmd->add_option("--cache-dir", o->cache_dir, "Token cache folder");
  cmd->add_option("--threads", o->threads, "CPU threads (default: all cores)");
  cmd->add_flag("--plain", o->plain, "Plain progress lines even on a terminal");
  cmd->add_flag("--json", o->json, "Print the result as JSON (with the most similar documents)");
  cmd->callback([o] { ExitOnError("audit", Run(*o)); });
}

}  // namespace flexfed::owner
