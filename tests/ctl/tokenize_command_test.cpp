// `flexfedctl tokenize` as a real process (ctl/tokenize_command.cpp), on a tokenizer the tokenizers
// library trained (tests/oracle/hf_tokenizer_cases.py).
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "tests/test_util.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

using testing::BinaryFromEnv;
using testing::RunCommand;
using testing::ValueOrDie;

TEST_CASE("flexfedctl tokenize prints the tokenizers library's ids, the pieces and the round trip", "[cli]") {
  const std::string dir = (std::filesystem::path(BinaryFromEnv("FLEXFED_TOKENIZER_ORACLE_DIR")) / "dolma2").string();
  const nlohmann::json oracle = nlohmann::json::parse(ValueOrDie(ReadFile(dir + "/cases.json")));
  const nlohmann::json& c = oracle["cases"][4];  // CJK, Korean, katakana
  const std::string text = c["text"];
  std::string out;
  REQUIRE(RunCommand(absl::StrCat(BinaryFromEnv("FLEXFED_CTL"), " tokenize ", dir, " --text '", text, "' --json"), &out) == 0);
  const nlohmann::json j = nlohmann::json::parse(out);
  REQUIRE(j["texts"].size() == 1);
  CHECK(j["texts"][0]["ids"] == c["ids"]);
  CHECK(j["texts"][0]["round_trip"] == true);
  CHECK(j["texts"][0]["pieces"].size() == c["ids"].size());
  CHECK(j["tokenizer"].get<std::string>().rfind("hf:", 0) == 0);
  REQUIRE(RunCommand(absl::StrCat(BinaryFromEnv("FLEXFED_CTL"), " tokenize ", dir, " --text 'a<|endoftext|>'"), &out) == 0);
  CHECK_THAT(out, Catch::Contains("2 tokens for 14 bytes"));
  CHECK(RunCommand(absl::StrCat(BinaryFromEnv("FLEXFED_CTL"), " tokenize ", dir), &out) == 1);
  CHECK_THAT(out, Catch::Contains("no input"));
}

}  // namespace
}  // namespace flexfed
