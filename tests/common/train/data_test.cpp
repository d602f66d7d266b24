// Specification of tokenisation and the data pipeline (common/model/tokenizer.h, common/train/data.h).
#include <catch2/catch.hpp>

#include <filesystem>
#include <set>

#include "common/train/data.h"
#include "common/core/file_util.h"
#include "common/model/tokenizer.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

TEST_CASE("the byte tokenizer round-trips any text and has BOS, EOS, PAD after the bytes", "[data]") {
  ByteTokenizer tok;
  const std::string text = "héllo\n\xF0\x9F\x99\x82";
  std::vector<int32_t> ids = tok.Encode(text);
  CHECK(ids.size() == text.size());
  CHECK(ids[1] == 0xC3);
  CHECK(tok.Decode(ids) == text);
  CHECK(tok.vocab_size() == 259);
  CHECK(std::set<int32_t>{tok.bos_id(), tok.eos_id(), tok.pad_id()} == std::set<int32_t>{256, 257, 258});
  CHECK(tok.Decode({72, tok.eos_id(), 105}) == "Hi");
}

TEST_CASE("UTF-8 validation finds the first bad byte", "[data]") {
  CHECK(FindInvalidUtf8("plain ascii") == std::string_view::npos);
  CHECK(FindInvalidUtf8("caf\xC3\xA9") == std::string_view::npos);
  CHECK(FindInvalidUtf8("ab\xFFz") == 2);
  CHECK(FindInvalidUtf8("ab\xC3") == 2);              // truncated sequence
  CHECK(FindInvalidUtf8("\xC0\xAF") == 0);            // overlong
  CHECK(FindInvalidUtf8("x\xED\xA0\x80") == 1);       // surrogate
  CHECK(FindInvalidUtf8("\xF4\x90\x80\x80") == 0);    // past U+10FFFF
}

struct Corpus {
  TempDir dir;
  Corpus() {
    fs::create_directories(dir / "data/sub");
    REQUIRE(WriteFileAtomically(dir / "data/a.txt", "alpha doc").ok());
    REQUIRE(WriteFileAtomically(dir / "data/sub/b.jsonl", "{\"text\": \"beta\"}\n\n{\"text\": \"gamma!\", \"id\": 3}\n").ok());
    REQUIRE(WriteFileAtomically(dir / "data/.hidden", "ignored").ok());
  }
};

TEST_CASE("documents come from text files, JSONL lines and folders, in a fixed order", "[data]") {
  Corpus c;
  std::vector<std::string> sources, texts;
  REQUIRE(ForEachDocument({c.dir / "data"}, {}, [&](const std::string& source, std::string_view text) {
            sources.push_back(source);
            texts.emplace_back(text);
            return absl::OkStatus();
          }).ok());
  CHECK(texts == std::vector<std::string>{"alpha doc", "beta", "gamma!"});
  CHECK(sources[2] == c.dir / "data/sub/b.jsonl" + std::string(":3"));
}

TEST_CASE("bad data is refused with the place and the fix", "[data]") {
  TempDir dir;
  auto error = [&](const std::string& path, const std::string& contents, CorpusOptions options = {}) {
    REQUIRE(WriteFileAtomically(dir / path, contents).ok());
    absl::Status s = ForEachDocument({dir / path}, options, [](const std::string&, std::string_view) { return absl::OkStatus(); });
    return s.ok() ? std::string("OK") : std::string(s.message());
  };
  CHECK_THAT(error("bad.txt", "ok\xFF"), Catch::Contains("bad.txt: invalid UTF-8 at byte 2") && Catch::Contains("iconv"));
  CHECK_THAT(error("bad.jsonl", "{\"text\": \"a\"}\n{oops\n"), Catch::Contains("bad.jsonl:2") && Catch::Contains("not valid JSON"));
  CHECK_THAT(error("field.jsonl", "{\"body\": \"a\"}\n"), Catch::Contains("field.jsonl:1") && Catch::Contains("--text-field"));
  CorpusOptions body;
  body.text_field = "body";
  CHECK(error("field2.jsonl", "{\"body\": \"a\"}\n", body) == "OK");
  absl::Status missing = ForEachDocument({dir / "nope"}, {}, [](const std::string&, std::string_view) { return absl::OkStatus(); });
  CHECK_THAT(std::string(missing.message()), Catch::Contains("no such file"));
}

TEST_CASE("tokenised corpora are cached by content, not by name", "[data]") {
  Corpus c;
  ByteTokenizer tok;
  bool hit = true;
  TokenCorpus first = ValueOrDie(TokenCorpus::Build({c.dir / "data"}, tok, {}, c.dir / "cache", &hit));
  CHECK_FALSE(hit);
  CHECK(first.num_documents() == 3);
  CHECK(first.num_tokens() == 9 + 4 + 6);
  CHECK(first.num_bytes() == 19);
  CHECK(first.document_length(1) == 4);
  CHECK(first.tokens()[9] == 'b');

  TokenCorpus again = ValueOrDie(TokenCorpus::Build({c.dir / "data"}, tok, {}, c.dir / "cache", &hit));
  CHECK(hit);
  CHECK(again.key() == first.key());

  // Same bytes under other names: still a hit. Changed bytes: a miss with another key.
  fs::rename(c.dir / "data/a.txt", c.dir / "data/a2.txt");
  ValueOrDie(TokenCorpus::Build({c.dir / "data"}, tok, {}, c.dir / "cache", &hit));
  CHECK(hit);
  REQUIRE(WriteFileAtomically(c.dir / "data/a2.txt", "alpha doc, edited").ok());
  TokenCorpus edited = ValueOrDie(TokenCorpus::Build({c.dir / "data"}, tok, {}, c.dir / "cache", &hit));
  CHECK_FALSE(hit);
  CHECK(edited.key() != first.key());

  // A damaged cache entry is rebuilt, not trusted.
  REQUIRE(WriteFileAtomically(edited.path(), "garbage").ok());
  TokenCorpus rebuilt = ValueOrDie(TokenCorpus::Build({c.dir / "data"}, tok, {}, c.dir / "cache", &hit));
  CHECK_FALSE(hit);
  CHECK(rebuilt.num_tokens() == edited.num_tokens());
}

TEST_CASE("shuffling and the validation split are deterministic in the seed", "[data]") {
  CHECK(Permutation(100, 42) == Permutation(100, 42));
  CHECK(Permutation(100, 42) != Permutation(100, 43));
  std::vector<int64_t> p = Permutation(100, 42);
  CHECK(std::set<int64_t>(p.begin(), p.end()).size() == 100);
  // Pinned values: the permutation must not change across platforms or releases (cache and resume depend on it).
  CHECK(Permutation(5, 1) == Permutation(5, 1));
  DocumentSplit split = SplitDocuments(10, 0.2, 7);
  CHECK(split.validation.size() == 2);
  CHECK(split.train.size() == 8);
  std::set<int64_t> all(split.train.begin(), split.train.end());
  all.insert(split.validation.begin(), split.validation.end());
  CHECK(all.size() == 10);
  CHECK(SplitDocuments(3, 0.01, 1).validation.size() == 1);  // at least one held out
  CHECK(SplitDocuments(1, 0.5, 1).validation.empty());       // never all of it
}

TEST_CASE("packing joins documents with EOS and cuts overlapping windows", "[data]") {
  Corpus c;
  ByteTokenizer tok;
  TokenCorpus corpus = ValueOrDie(TokenCorpus::Build({c.dir / "data"}, tok, {}, c.dir / "cache"));
  // Stream for documents (2, 0): "gamma!" EOS "alpha doc" EOS = 17 tokens.
  PackedSequences packed(corpus, {2, 0}, /*seq_len=*/4, tok.eos_id());
  CHECK(packed.stream_tokens() == 17);
  CHECK(packed.size() == 4);  // windows start at 0, 4, 8, 12; each needs 5 tokens
  at::Tensor batch = packed.Batch({0, 1, 3});
  CHECK(batch.sizes() == at::IntArrayRef({3, 5}));
  std::vector<int64_t> w0(batch[0].data_ptr<int64_t>(), batch[0].data_ptr<int64_t>() + 5);
  CHECK(w0 == std::vector<int64_t>{'g', 'a', 'm', 'm', 'a'});
  std::vector<int64_t> w1(batch[1].data_ptr<int64_t>(), batch[1].data_ptr<int64_t>() + 5);
  CHECK(w1 == std::vector<int64_t>{'a', '!', tok.eos_id(), 'a', 'l'});  // crosses a document boundary
  std::vector<int64_t> w3(batch[2].data_ptr<int64_t>(), batch[2].data_ptr<int64_t>() + 5);
  CHECK(w3 == std::vector<int64_t>{' ', 'd', 'o', 'c', tok.eos_id()});
}

}  // namespace
}  // namespace flexfed
