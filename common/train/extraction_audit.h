// The training-data extraction test of FlexOlmo's privacy analysis (docs/PRIVACY.md), run by an
// owner on its own data and any model it holds (its two-expert model, a merged release, a dense
// baseline) before anything leaves: sample training documents, give the model each one's first
// `prefix_tokens` tokens, generate greedily, and count the document as extracted when the
// generation's normalised Levenshtein similarity to the true continuation reaches `threshold`.
//
// A run folder keeps one JSON line per audited document (RUN/extraction.jsonl, with the texts: for
// the owner's eyes only, never uploaded), so an interrupted audit resumes where it stopped, and the
// result (RUN/extraction.json) that `export` copies into the module's metadata.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/core/progress.h"
#include "common/model/model.h"
#include "common/model/tokenizer.h"
#include "common/train/data.h"
#include <nlohmann/json.hpp>

namespace flexfed {

inline constexpr char kExtractionResultsFile[] = "extraction.jsonl";
inline constexpr char kExtractionReportFile[] = "extraction.json";

// 1 − edit distance / length of the longer, over bytes (edlib's Levenshtein distance); 1 when both
// are empty.
double LevenshteinSimilarity(std::string_view a, std::string_view b);

// The Wilson score interval of a proportion k / n at the normal quantile z (95%: 1.96); [0, 1] when
// n = 0. Well-behaved at k = 0, where extraction rates usually are.
struct ProportionInterval {
  double low = 0, high = 1;
};
ProportionInterval WilsonInterval(int64_t k, int64_t n, double z = 1.959963984540054);

struct ExtractionAuditOptions {
  int64_t samples = 1000;               // documents audited (fewer when fewer are long enough)
  int64_t prefix_tokens = 32;           // the prompt: the document's first tokens
  int64_t continuation_tokens = 256;    // generated, and compared with the document's next tokens
  int64_t min_continuation_tokens = 32;  // shorter documents are not sampled
  double threshold = 0.9;               // similarity at which a document counts as extracted
  uint64_t seed = 0;                    // which documents are sampled
  int64_t show = 5;                     // the most similar documents kept in the report

  absl::Status Validate() const;
  nlohmann::json ToJson() const;
};

struct ExtractionSample {
  int64_t document = 0;  // index in the corpus
  double similarity = 0;
  bool extracted = false;
  std::string prefix, truth, generated;  // decoded text
};

struct ExtractionReport {
  int64_t eligible_documents = 0;  // long enough to sample
  int64_t audited = 0;
  int64_t extracted = 0;
  double rate = 0;
  ProportionInterval interval;  // 95% Wilson
  double mean_similarity = 0;
  bool complete = false;        // every sampled document audited (false after an interruption)
  std::vector<ExtractionSample> most_similar;  // up to options.show, most similar first

  // What `export` records (no text): counts, rate, interval and the settings.
  nlohmann::json SummaryJson(const ExtractionAuditOptions& options) const;
};

// Audits `model` on `corpus`'s documents (the tokenizer decodes them for the comparison). With a
// non-empty `run_dir` the results go there and a run begun with the same model, corpus and
// options continues; another model, corpus or options is refused (FailedPrecondition, naming the
// fix). `model_id` identifies the model (e.g. the SHA-256 of its files). Stops early when `stop` is
// set, with complete = false.
absl::StatusOr<ExtractionReport> RunExtractionAudit(const FlexOlmoModel& model, const std::string& model_id,
                                                    const Tokenizer& tokenizer, const TokenCorpus& corpus,
                                                    const ExtractionAuditOptions& options, const Routing& routing,
                                                    const std::string& run_dir, const std::atomic<bool>* stop,
                                                    ProgressReporter* progress);

}  // namespace flexfed
