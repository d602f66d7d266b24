#include "common/train/extraction_audit.h"

#include <edlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/core/file_util.h"
#include "common/model/generation.h"

namespace flexfed {
namespace {

namespace fs = std::filesystem;

absl::Status Bad(const std::string& message) { return absl::InvalidArgumentError(message); }

ExtractionSample SampleFromJson(const nlohmann::json& j) {
  ExtractionSample s;
  s.document = j.at("document");
  s.similarity = j.at("similarity");
  s.extracted = j.at("extracted");
  s.prefix = j.value("prefix", "");
  s.truth = j.value("truth", "");
  s.generated = j.value("generated", "");
  return s;
}

// Texts cut at token boundaries can end inside a UTF-8 character: such bytes are written as U+FFFD
// (the similarity is computed on the bytes themselves, before).
std::string DumpLine(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

nlohmann::json SampleToJson(const ExtractionSample& s) {
  return {{"document", s.document}, {"similarity", s.similarity}, {"extracted", s.extracted},
          {"prefix", s.prefix},     {"truth", s.truth},           {"generated", s.generated}};
}

// The results already in RUN/extraction.jsonl, by document. A last line cut short by a crash is
// dropped (it is audited again); a malformed line elsewhere means the file was edited: an error.
absl::StatusOr<std::map<int64_t, ExtractionSample>> ReadResults(const fs::path& path) {
  std::map<int64_t, ExtractionSample> done;
  std::ifstream in(path);
  if (!in) return done;
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  for (size_t i = 0; i < lines.size(); ++i) {
    nlohmann::json j = nlohmann::json::parse(lines[i], nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("document") || !j.contains("similarity") ||
        !j.contains("extracted")) {
      if (i + 1 == lines.size()) break;
      return absl::DataLossError(absl::StrCat(path.string(), " line ", i + 1,
                                              ": not an audit result; delete the run folder and audit again"));
    }
    ExtractionSample s = SampleFromJson(j);
    done[s.document] = std::move(s);
  }
  return done;
}

}  // namespace

double LevenshteinSimilarity(std::string_view a, std::string_view b) {
  const size_t longer = std::max(a.size(), b.size());
  if (longer == 0) return 1.0;
  EdlibAlignResult r = edlibAlign(a.data(), static_cast<int>(a.size()), b.data(), static_cast<int>(b.size()),
                                  edlibDefaultAlignConfig());  // global (NW) alignment: Levenshtein distance
  const int distance = r.editDistance;
  edlibFreeAlignResult(r);
  TORCH_CHECK(distance >= 0, "edlib failed on strings of ", a.size(), " and ", b.size(), " bytes");
  return 1.0 - static_cast<double>(distance) / static_cast<double>(longer);
}

ProportionInterval WilsonInterval(int64_t k, int64_t n, double z) {
  if (n <= 0) return {0, 1};
  const double p = static_cast<double>(k) / n, nn = static_cast<double>(n), z2 = z * z;
  const double center = (p + z2 / (2 * nn)) / (1 + z2 / nn);
  const double half = z / (1 + z2 / nn) * std::sqrt(p * (1 - p) / nn + z2 / (4 * nn * nn));
  // At k = 0 and k = n the bound is exactly 0 and 1 (the formula gives them up to rounding).
  return {k == 0 ? 0.0 : std::max(0.0, center - half), k == n ? 1.0 : std::min(1.0, center + half)};
}

absl::Status ExtractionAuditOptions::Validate() const {
  if (samples < 1) return Bad("--samples must be at least 1");
  if (prefix_tokens < 1) return Bad("--prefix-tokens must be at least 1");
  if (continuation_tokens < 1) return Bad("--continuation-tokens must be at least 1");
  if (min_continuation_tokens < 1 || min_continuation_tokens > continuation_tokens)
    return Bad("--min-continuation-tokens must be between 1 and --continuation-tokens");
  if (!(threshold > 0 && threshold <= 1)) return Bad("--threshold must be in (0, 1] (the paper: 0.9)");
  if (show < 0) return Bad("--show must not be negative");
  return absl::OkStatus();
}

nlohmann::json ExtractionAuditOptions::ToJson() const {
  return {{"samples", samples},
          {"prefix_tokens", prefix_tokens},
          {"continuation_tokens", continuation_tokens},
          {"min_continuation_tokens", min_continuation_tokens},
          {"threshold", threshold},
          {"seed", seed}};
}

nlohmann::json ExtractionReport::SummaryJson(const ExtractionAuditOptions& options) const {
  return {{"audited", audited},
          {"extracted", extracted},
          {"rate", rate},
          {"rate_95ci", {interval.low, interval.high}},
          {"mean_similarity", mean_similarity},
          {"eligible_documents", eligible_documents},
          {"complete", complete},
          {"settings", options.ToJson()}};
}

absl::StatusOr<ExtractionReport> RunExtractionAudit(const FlexOlmoModel& model, const std::string& model_id,
                                                    const Tokenizer& tokenizer, const TokenCorpus& corpus,
                                                    const ExtractionAuditOptions& options, const Routing& routing,
                                                    const std::string& run_dir, const std::atomic<bool>* stop,
                                                    ProgressReporter* progress) {
  if (absl::Status s = options.Validate(); !s.ok()) return s;
  const int64_t context = model.config().max_position_embeddings;
  if (options.prefix_tokens + options.continuation_tokens > context) {
    return Bad(absl::StrFormat("--prefix-tokens + --continuation-tokens = %d exceeds the model's %d positions",
                               options.prefix_tokens + options.continuation_tokens, context));
  }
  std::vector<int64_t> eligible;
  for (int64_t d = 0; d < corpus.num_documents(); ++d) {
    if (corpus.document_length(d) >= options.prefix_tokens + options.min_continuation_tokens) eligible.push_back(d);
  }
  if (eligible.empty()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no document has %d tokens (prefix %d + at least %d to compare); give longer documents or lower "
        "--prefix-tokens / --min-continuation-tokens",
        options.prefix_tokens + options.min_continuation_tokens, options.prefix_tokens,
        options.min_continuation_tokens));
  }
  const std::vector<int64_t> order = Permutation(static_cast<int64_t>(eligible.size()), options.seed);
  const int64_t n = std::min<int64_t>(options.samples, static_cast<int64_t>(eligible.size()));

  std::map<int64_t, ExtractionSample> done;
  std::ofstream results;
  if (!run_dir.empty()) {
    const fs::path run(run_dir);
    std::error_code ec;
    fs::create_directories(run, ec);
    if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create the run folder ", run_dir, ": ", ec.message()));
    const nlohmann::json identity = {{"model", model_id}, {"corpus", corpus.key()}, {"settings", options.ToJson()}};
    const fs::path config_path = run / "audit_config.json";
    if (fs::exists(config_path)) {
      absl::StatusOr<std::string> text = ReadFile(config_path.string());
      if (!text.ok()) return text.status();
      nlohmann::json previous = nlohmann::json::parse(*text, nullptr, false);
      if (previous != identity) {
        return absl::FailedPreconditionError(absl::StrCat(
            run_dir, " holds an audit of another model, data or settings; give a new --run folder (or delete this one)"));
      }
    } else if (absl::Status s = WriteFileAtomically(config_path.string(), identity.dump(2) + "\n"); !s.ok()) {
      return s;
    }
    absl::StatusOr<std::map<int64_t, ExtractionSample>> previous = ReadResults(run / kExtractionResultsFile);
    if (!previous.ok()) return previous.status();
    done = *std::move(previous);
    // Rewritten whole: drops a line cut short by a crash before appending.
    std::string kept;
    for (const auto& [doc, sample] : done) kept += DumpLine(SampleToJson(sample)) + "\n";
    if (absl::Status s = WriteFileAtomically((run / kExtractionResultsFile).string(), kept); !s.ok()) return s;
    results.open(run / kExtractionResultsFile, std::ios::app);
    if (!results) return absl::PermissionDeniedError(absl::StrCat("cannot write ", (run / kExtractionResultsFile).string()));
  }

  GenerateOptions gen;
  gen.temperature = 0;  // greedy, as the paper's attack
  gen.stop_at_eos = false;
  const auto start = std::chrono::steady_clock::now();
  int64_t new_done = 0, todo = 0;
  for (int64_t i = 0; i < n; ++i) todo += done.count(eligible[order[i]]) == 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t doc = eligible[order[i]];
    if (done.count(doc)) continue;
    if (stop != nullptr && stop->load()) break;
    const int32_t* tokens = corpus.tokens() + corpus.doc_offsets()[doc];
    const int64_t length = corpus.document_length(doc);
    const std::vector<int32_t> prefix(tokens, tokens + options.prefix_tokens);
    const int64_t compare = std::min(options.continuation_tokens, length - options.prefix_tokens);
    const std::vector<int32_t> truth(tokens + options.prefix_tokens, tokens + options.prefix_tokens + compare);
    gen.max_new_tokens = compare;
    absl::StatusOr<GenerateResult> out = Generate(model, tokenizer, prefix, gen, routing);
    if (!out.ok()) return out.status();
    ExtractionSample s;
    s.document = doc;
    s.prefix = tokenizer.Decode(prefix);
    s.truth = tokenizer.Decode(truth);
    s.generated = tokenizer.Decode(out->tokens);
    s.similarity = LevenshteinSimilarity(s.generated, s.truth);
    s.extracted = s.similarity >= options.threshold;
    if (results.is_open()) {
      results << DumpLine(SampleToJson(s)) << "\n";
      results.flush();
      if (!results) return absl::DataLossError(absl::StrCat("writing ", run_dir, "/", kExtractionResultsFile, " failed"));
    }
    done[doc] = std::move(s);
    ++new_done;
    if (progress != nullptr) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      int64_t extracted = 0;
      for (const auto& [d, r] : done) extracted += r.extracted;
      progress->Update(static_cast<int64_t>(done.size()), n,
                       absl::StrFormat("extracted %d | %.1f s/document", extracted, elapsed / new_done),
                       elapsed / new_done * static_cast<double>(todo - new_done));
    }
  }
  if (progress != nullptr) progress->Finish();

  ExtractionReport report;
  report.eligible_documents = static_cast<int64_t>(eligible.size());
  std::vector<const ExtractionSample*> audited;
  for (int64_t i = 0; i < n; ++i) {
    auto it = done.find(eligible[order[i]]);
    if (it != done.end()) audited.push_back(&it->second);
  }
  report.audited = static_cast<int64_t>(audited.size());
  report.complete = report.audited == n;
  double similarity_sum = 0;
  for (const ExtractionSample* s : audited) {
    report.extracted += s->extracted;
    similarity_sum += s->similarity;
  }
  report.rate = report.audited > 0 ? static_cast<double>(report.extracted) / report.audited : 0;
  report.mean_similarity = report.audited > 0 ? similarity_sum / report.audited : 0;
  report.interval = WilsonInterval(report.extracted, report.audited);
  std::stable_sort(audited.begin(), audited.end(),
                   [](const ExtractionSample* a, const ExtractionSample* b) { return a->similarity > b->similarity; });
  for (int64_t i = 0; i < std::min<int64_t>(options.show, report.audited); ++i) report.most_similar.push_back(*audited[i]);
  if (!run_dir.empty()) {
    nlohmann::json summary = report.SummaryJson(options);
    summary["model"] = model_id;
    summary["corpus"] = corpus.key();
    if (absl::Status s = WriteFileAtomically((fs::path(run_dir) / kExtractionReportFile).string(), summary.dump(2) + "\n");
        !s.ok()) {
      return s;
    }
  }
  return report;
}

}  // namespace flexfed
