// Hugging Face tokenizer.json tokenizers (common/model/hf_tokenizer.h) against the `tokenizers`
// library: the tokenizers it trained at test time and what it encoded and decoded
// (tests/oracle/hf_tokenizer_cases.py).
#include <catch2/catch.hpp>

#include <cstdlib>
#include <functional>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "common/core/file_util.h"
#include "common/model/hf_tokenizer.h"
#include "common/model/tokenizer.h"
#include "common/train/data.h"
#include "tests/temp_dir.h"
#include "tests/test_util.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

std::string OracleTokenizerDir(const std::string& name) {
  const char* dir = std::getenv("FLEXFED_TOKENIZER_ORACLE_DIR");
  if (dir == nullptr) throw std::runtime_error("set FLEXFED_TOKENIZER_ORACLE_DIR to build/oracle_tokenizers (ctest does)");
  return (fs::path(dir) / name).string();
}

std::string Show(const std::vector<int32_t>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size(); ++i) s << (i ? "," : "") << ids[i];
  return s.str();
}

TEST_CASE("tokenizer.json BPE encodes and decodes exactly as the tokenizers library", "[tokenizer][oracle]") {
  for (const char* name : {"dolma2", "llama3", "gpt2", "variety"}) {
    INFO("tokenizer " << name);
    const std::string dir = OracleTokenizerDir(name);
    const nlohmann::json oracle = nlohmann::json::parse(ValueOrDie(ReadFile(dir + "/cases.json")));
    std::unique_ptr<Tokenizer> tok = ValueOrDie(LoadHfTokenizer(dir));
    CHECK(tok->vocab_size() == oracle["vocab_size"].get<int64_t>());
    CHECK(tok->eos_id() == oracle["eos"].get<int32_t>());
    CHECK(tok->bos_id() == oracle["eos"].get<int32_t>());  // no BOS token: documents start after EOS
    CHECK(tok->pad_id() == oracle["pad"].get<int32_t>());
    CHECK(tok->id().rfind("hf:", 0) == 0);
    for (const nlohmann::json& c : oracle["cases"]) {
      const std::string text = c["text"];
      const std::vector<int32_t> expected = c["ids"].get<std::vector<int32_t>>();
      INFO("text: " << text);
      const std::vector<int32_t> ids = tok->Encode(text);
      INFO("ours:   " << Show(ids) << "\ntheirs: " << Show(expected));
      CHECK(ids == expected);
      const std::string decoded = tok->Decode(expected);
      CHECK(decoded == c["decoded"].get<std::string>());
      // Bits per byte stays exact: the tokens' byte counts add up to the text they stand for.
      int64_t bytes = 0;
      for (int32_t id : expected) bytes += tok->TokenBytes(id);
      CHECK(bytes == static_cast<int64_t>(decoded.size()));
      // decode(encode(x)) == x, but where x holds special tokens (skipped), added tokens that strip
      // the whitespace around them (<tool>), or text NFC changes (the variety tokenizer normalizes).
      const bool lossy = text.find("<|") != std::string::npos || text.find("<tool>") != std::string::npos;
      if (std::string(name) != "variety" && !lossy) CHECK(tok->Decode(ids) == text);
    }
  }
}

TEST_CASE("a model directory with a tokenizer.json uses it; a vocabulary too small for it is refused", "[tokenizer]") {
  const std::string dir = OracleTokenizerDir("dolma2");
  std::unique_ptr<Tokenizer> tok = ValueOrDie(TokenizerForModel(dir, 1024));  // padded like OLMo-2's 100352
  CHECK(tok->id().rfind("hf:", 0) == 0);
  CHECK(tok->Encode("hello world") == ValueOrDie(LoadHfTokenizer(dir))->Encode("hello world"));
  absl::StatusOr<std::unique_ptr<Tokenizer>> small = TokenizerForModel(dir, 100);
  REQUIRE_FALSE(small.ok());
  CHECK_THAT(std::string(small.status().message()), Catch::Contains("vocabulary has 100 rows"));
}

TEST_CASE("a corpus tokenised on every core holds each document's ids in order", "[tokenizer]") {
  // More documents than one batch (8192) of TokenCorpus::Build, each different, so a reordering shows.
  const std::string dir = OracleTokenizerDir("dolma2");
  std::unique_ptr<Tokenizer> tok = ValueOrDie(LoadHfTokenizer(dir));
  const nlohmann::json oracle = nlohmann::json::parse(ValueOrDie(ReadFile(dir + "/cases.json")));
  TempDir tmp;
  std::string jsonl;
  std::vector<std::string> docs;
  for (int i = 0; i < 20000; ++i) {
    const std::string base = oracle["cases"][static_cast<size_t>(i) % oracle["cases"].size()]["text"];
    docs.push_back(std::to_string(i * 7919 % 100003) + " " + base.substr(0, static_cast<size_t>(i) % 97 + 1));
    if (FindInvalidUtf8(docs.back()) != std::string_view::npos) docs.back() = std::to_string(i) + " plain";
    jsonl += nlohmann::json({{"text", docs.back()}}).dump() + "\n";
  }
  REQUIRE(WriteFileAtomically(tmp / "docs.jsonl", jsonl).ok());
  TokenCorpus corpus = ValueOrDie(TokenCorpus::Build({tmp / "docs.jsonl"}, *tok, {}, tmp / "cache"));
  REQUIRE(corpus.num_documents() == 20000);
  int64_t bytes = 0;
  bool all_equal = true;
  for (int64_t d = 0; d < 20000; ++d) {
    const std::vector<int32_t> ids = tok->Encode(docs[static_cast<size_t>(d)]);
    bytes += static_cast<int64_t>(docs[static_cast<size_t>(d)].size());
    const int32_t* got = corpus.tokens() + corpus.doc_offsets()[d];
    all_equal = all_equal && corpus.document_length(d) == static_cast<int64_t>(ids.size()) &&
                std::equal(ids.begin(), ids.end(), got);
    if (!all_equal) FAIL("document " << d << " differs from encoding it alone");
  }
  CHECK(all_equal);
  CHECK(corpus.num_bytes() == bytes);
}

TEST_CASE("invalid UTF-8 encodes as U+FFFD, as a Python string of the same bytes would", "[tokenizer]") {
  std::unique_ptr<Tokenizer> tok = ValueOrDie(LoadHfTokenizer(OracleTokenizerDir("dolma2")));
  CHECK(tok->Encode("ab\xFF" "cd") == tok->Encode("ab\xEF\xBF\xBD" "cd"));
  CHECK(tok->Encode("\xC3") == tok->Encode("\xEF\xBF\xBD"));
}

TEST_CASE("tokenizer.json that FlexFed cannot honour is refused with the field named", "[tokenizer]") {
  TempDir dir;
  const nlohmann::json good = nlohmann::json::parse(ValueOrDie(ReadFile(OracleTokenizerDir("dolma2") + "/tokenizer.json")));
  auto refused = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& expected) {
    nlohmann::json j = good;
    edit(j);
    REQUIRE(WriteFileAtomically(dir / "tokenizer.json", j.dump()).ok());
    absl::StatusOr<std::unique_ptr<Tokenizer>> t = LoadHfTokenizer(dir.path());
    REQUIRE_FALSE(t.ok());
    CHECK_THAT(std::string(t.status().message()), Catch::Contains(expected));
  };
  refused([](nlohmann::json& j) { j["model"]["type"] = "WordPiece"; }, "model type 'WordPiece'");
  refused([](nlohmann::json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }, "normalizer");
  refused([](nlohmann::json& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }, "pre_tokenizer type 'Whitespace'");
  refused([](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed"; }, "does not compile");
  refused([](nlohmann::json& j) { j["model"]["merges"][0] = nlohmann::json::array({"Ġ", "nosuchtoken"}); }, "uses a token");
  refused([](nlohmann::json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, "decoder 'WordPiece'");
  refused([](nlohmann::json& j) { j["model"]["byte_fallback"] = true; }, "byte_fallback");
  REQUIRE(WriteFileAtomically(dir / "tokenizer.json", "{not json").ok());
  CHECK_FALSE(LoadHfTokenizer(dir.path()).ok());
}

}  // namespace
}  // namespace flexfed
