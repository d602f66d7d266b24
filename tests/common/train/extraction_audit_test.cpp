// Specification of the extraction audit (common/train/extraction_audit.h): the similarity and the
// interval against plain references, and the audit finding canaries a model memorised.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/model/tokenizer.h"
#include "common/train/extraction_audit.h"
#include "common/train/training.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

// The textbook dynamic programme, the reference for edlib's distance.
int ReferenceLevenshtein(const std::string& a, const std::string& b) {
  std::vector<int> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    int diagonal = row[0];
    row[0] = static_cast<int>(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      const int up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = up;
    }
  }
  return row[b.size()];
}

TEST_CASE("similarity is one minus the Levenshtein distance over the longer length", "[privacy]") {
  CHECK(LevenshteinSimilarity("kitten", "sitting") == Approx(1.0 - 3.0 / 7.0));
  CHECK(LevenshteinSimilarity("", "") == 1.0);
  CHECK(LevenshteinSimilarity("abc", "") == 0.0);
  CHECK(LevenshteinSimilarity("same text", "same text") == 1.0);
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    // Small alphabets make many near-matches; lengths up to 300 bytes, UTF-8 bytes included.
    const char alphabet[] = "ab c\xc3\xa9";
    auto draw = [&] {
      std::string s(rng() % 300, ' ');
      for (char& c : s) c = alphabet[rng() % 6];
      return s;
    };
    const std::string a = draw(), b = draw();
    const double longer = static_cast<double>(std::max(a.size(), b.size()));
    const double expected = longer == 0 ? 1.0 : 1.0 - ReferenceLevenshtein(a, b) / longer;
    CHECK(LevenshteinSimilarity(a, b) == Approx(expected).epsilon(1e-12));
  }
}

TEST_CASE("the Wilson interval covers the rate and stays in [0, 1]", "[privacy]") {
  const ProportionInterval none = WilsonInterval(0, 100);
  CHECK(none.low == 0.0);
  CHECK(none.high == Approx(0.0370).margin(5e-4));  // the textbook value for 0 of 100
  const ProportionInterval half = WilsonInterval(50, 100);
  CHECK(half.low == Approx(0.4038).margin(5e-4));
  CHECK(half.high == Approx(0.5962).margin(5e-4));
  const ProportionInterval all = WilsonInterval(20, 20);
  CHECK(all.high == 1.0);
  CHECK(all.low == Approx(0.8389).margin(5e-4));
  CHECK(WilsonInterval(0, 0).high == 1.0);
}

// Canary documents: a fixed opening, then a random code and words a model can only know by heart.
std::vector<std::string> Canaries(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  const char* words[] = {"amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor"};
  std::vector<std::string> out;
  for (int k = 0; k < n; ++k) {
    std::string code, phrase;
    for (int i = 0; i < 12; ++i) code += static_cast<char>('0' + rng() % 10);
    for (int i = 0; i < 6; ++i) phrase += absl::StrCat(words[rng() % 8], i < 5 ? " " : "");
    out.push_back(absl::StrCat("record ", k, " of the vault: code ", code, ", phrase ", phrase, ", end of record.\n"));
  }
  return out;
}

void WriteJsonl(const std::string& path, const std::vector<std::string>& docs, int copies) {
  std::ofstream out(path);
  for (int c = 0; c < copies; ++c) {
    for (const std::string& d : docs) out << nlohmann::json({{"text", d}}).dump() << "\n";
  }
}

TEST_CASE("the audit finds canaries a model memorised and not text it never saw", "[privacy]") {
  TempDir dir;
  const std::vector<std::string> canaries = Canaries(4, 11), unseen = Canaries(4, 12);
  WriteJsonl(dir / "train.jsonl", canaries, 60);
  WriteJsonl(dir / "canaries.jsonl", canaries, 1);
  WriteJsonl(dir / "unseen.jsonl", unseen, 1);
  TrainConfig c;
  c.mode = "pretrain";
  c.preset = "test";
  c.data = {dir / "train.jsonl"};
  c.seq_len = 64;
  c.batch_size = 8;
  c.max_steps = 150;
  c.lr = 3e-3;
  c.warmup_steps = 10;
  c.val_every = 0;
  c.checkpoint_every = 0;
  c.validation_fraction = 0;
  c.threads = 2;
  auto trainer = ValueOrDie(Trainer::Create(c, {"", "", dir / "run", dir / "cache"}, false));
  ValueOrDie(trainer->Run(nullptr, nullptr));
  const FlexOlmoModel model = ValueOrDie(FlexOlmoModel::Load(dir / "run/model"));
  const ByteTokenizer tok;

  ExtractionAuditOptions o;
  o.samples = 4;
  o.prefix_tokens = 24;
  o.continuation_tokens = 48;
  o.min_continuation_tokens = 16;
  const TokenCorpus memorised = ValueOrDie(TokenCorpus::Build({dir / "canaries.jsonl"}, tok, {}, dir / "cache"));
  const ExtractionReport found = ValueOrDie(RunExtractionAudit(model, "m", tok, memorised, o, {}, dir / "audit", nullptr, nullptr));
  CHECK(found.audited == 4);
  CHECK(found.complete);
  CHECK(found.extracted >= 3);
  CHECK(found.interval.low > 0.2);
  REQUIRE(!found.most_similar.empty());
  CHECK(found.most_similar[0].similarity >= 0.9);
  CHECK(memorised.num_documents() == 4);

  const TokenCorpus fresh = ValueOrDie(TokenCorpus::Build({dir / "unseen.jsonl"}, tok, {}, dir / "cache"));
  const ExtractionReport missed = ValueOrDie(RunExtractionAudit(model, "m", tok, fresh, o, {}, "", nullptr, nullptr));
  CHECK(missed.extracted == 0);
  CHECK(missed.mean_similarity < found.mean_similarity);

  // Regression: a prefix ending inside a two-byte character (the byte tokenizer cuts there, as BPE
  // can) made the results line invalid UTF-8 and the audit threw while writing it.
  WriteJsonl(dir / "straddle.jsonl", {std::string(23, 'a') + "\xc3\xa9" + std::string(60, 'b')}, 1);
  const TokenCorpus straddle = ValueOrDie(TokenCorpus::Build({dir / "straddle.jsonl"}, tok, {}, dir / "cache"));
  const ExtractionReport cut = ValueOrDie(RunExtractionAudit(model, "m", tok, straddle, o, {}, dir / "audit_cut", nullptr, nullptr));
  CHECK(cut.audited == 1);
  CHECK(ValueOrDie(ReadFile(dir / "audit_cut/extraction.jsonl")).find("\xef\xbf\xbd") != std::string::npos);  // U+FFFD

  SECTION("an interrupted audit resumes; another model or setting in the same folder is refused") {
    // Keep the first result and a line cut short by a crash; the rest is audited again, the same.
    std::ifstream in(dir / "audit/extraction.jsonl");
    std::string first;
    std::getline(in, first);
    in.close();
    REQUIRE(WriteFileAtomically(dir / "audit/extraction.jsonl", first + "\n{\"document\": 2, \"simil").ok());
    const ExtractionReport resumed =
        ValueOrDie(RunExtractionAudit(model, "m", tok, memorised, o, {}, dir / "audit", nullptr, nullptr));
    CHECK(resumed.extracted == found.extracted);
    CHECK(resumed.mean_similarity == found.mean_similarity);
    ExtractionAuditOptions other = o;
    other.threshold = 0.8;
    absl::StatusOr<ExtractionReport> refused =
        RunExtractionAudit(model, "m", tok, memorised, other, {}, dir / "audit", nullptr, nullptr);
    CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK(RunExtractionAudit(model, "another", tok, memorised, o, {}, dir / "audit", nullptr, nullptr).status().code() ==
          absl::StatusCode::kFailedPrecondition);
  }
}

TEST_CASE("audit settings out of range are refused with the option named", "[privacy]") {
  ExtractionAuditOptions o;
  o.threshold = 1.5;
  CHECK(o.Validate().message().find("--threshold") != std::string::npos);
  o = {};
  o.min_continuation_tokens = 300;
  CHECK(o.Validate().message().find("--min-continuation-tokens") != std::string::npos);
}

}  // namespace
}  // namespace flexfed
