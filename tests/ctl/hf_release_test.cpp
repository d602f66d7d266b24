// A FlexFed release is a Hugging Face checkpoint as it is: transformers' AutoModelForCausalLM
// loads what `flexfedctl merge` writes and computes what `flexfedctl logits` computes on it
// (tests/oracle/hf_release_logits.py). The coordinator's `release export` is checked the same way
// end to end in tests/coordinator/federation_test.cpp.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "common/core/file_util.h"

#include "absl/strings/str_cat.h"
#include "tests/common/merge/federation_fixture.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::BinaryFromEnv;
using testing::Federation;
using testing::RunCommand;
using testing::ValueOrDie;

TEST_CASE("a merged release loads in transformers as it is and gives flexfedctl's logits", "[cli]") {
  Federation f;
  const std::string modules = f.Module("code", 1, /*with_bias=*/false) + " " + f.Module("math", 2, false) + " " +
                              f.Module("bible", 3, false);
  const std::string ctl = BinaryFromEnv("FLEXFED_CTL");
  std::string out;
  for (const int k : {2, 4}) {  // k < E routes; k = E weighs every expert
    INFO("k = " << k);
    const std::string release = f.dir / ("release_k" + std::to_string(k));
    const std::string logits = release + ".logits.safetensors";
    REQUIRE(RunCommand(absl::StrCat(ctl, " merge ", modules, " --anchor ", f.anchor_dir, " --k ", k, " --out ", release),
                       &out) == 0);
    REQUIRE(RunCommand(absl::StrCat(ctl, " logits ", release, " --ids 3,1,4,1,5,9,2,6,5,3,5,8 --ids 7,200,13 -o ", logits),
                       &out) == 0);
    const int status = RunCommand(absl::StrCat(BinaryFromEnv("FLEXFED_HF_RELEASE_CHECK"), " ", release, " ", logits), &out);
    INFO(out);
    CHECK(status == 0);
    CHECK_THAT(out, Catch::Contains("FlexOlmoForCausalLM (flex_olmo, 4 experts)"));
  }
}

TEST_CASE("a release of an anchor with a tokenizer.json carries it: AutoTokenizer gives FlexFed's ids", "[cli]") {
  // The dolma2-style tokenizer the tokenizers library trained (tests/oracle/hf_tokenizer_cases.py),
  // its 820 ids in a vocabulary padded to 1024 rows as OLMo-2 pads 100278 to 100352.
  const std::string tokenizer_dir =
      (std::filesystem::path(BinaryFromEnv("FLEXFED_TOKENIZER_ORACLE_DIR")) / "dolma2").string();
  Federation f(11, tokenizer_dir, 1024);
  const std::string ctl = BinaryFromEnv("FLEXFED_CTL");
  const std::string release = f.dir / "release";
  const std::string logits = release + ".logits.safetensors";
  std::string out;
  REQUIRE(RunCommand(absl::StrCat(ctl, " merge ", f.Module("code", 1, false), " ", f.Module("math", 2, false),
                                  " --anchor ", f.anchor_dir, " --k 2 --out ", release), &out) == 0);
  CHECK_THAT(out, Catch::Contains("exact: transformers and vLLM compute from this checkpoint the model FlexFed computes"));
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    CHECK(ValueOrDie(ReadFile(release + "/" + name)) == ValueOrDie(ReadFile(f.anchor_dir + "/" + name)));
  }
  REQUIRE(RunCommand(absl::StrCat(ctl, " logits ", release, " --ids 3,1,4,1,5",
                                  " --text 'def f(x):\n\treturn x ** 2  # 12345'",
                                  " --text '東京タワー 🇯🇵 naïve café, שלום 👋🏽'",
                                  " --text 'a<|endoftext|>b' -o ", logits), &out) == 0);
  const int status = RunCommand(absl::StrCat(BinaryFromEnv("FLEXFED_HF_RELEASE_CHECK"), " ", release, " ", logits), &out);
  INFO(out);
  CHECK(status == 0);
  CHECK_THAT(out, Catch::Contains("3 of 3 texts tokenised as FlexFed did"));
  CHECK_THAT(out, Catch::Contains("FlexOlmoForCausalLM (flex_olmo, 3 experts)"));
}

TEST_CASE("merging experts with router biases says the HF reading differs, and by how much on held-out text", "[cli]") {
  Federation f;
  const std::string modules = f.Module("code", 1) + " " + f.Module("math", 2);
  const std::string ctl = BinaryFromEnv("FLEXFED_CTL");
  REQUIRE(WriteFileAtomically(f.dir / "held_out.txt", std::string(3000, 'x') + " held-out text, not seen in training").ok());
  std::string out;
  REQUIRE(RunCommand(absl::StrCat(ctl, " merge ", modules, " --anchor ", f.anchor_dir, " --out ", f.dir / "a"), &out) == 0);
  CHECK_THAT(out, Catch::Contains("not exact: transformers and vLLM cannot apply the owners' negative router biases") &&
                      Catch::Contains("pass --held-out TEXT"));
  REQUIRE(RunCommand(absl::StrCat("FLEXFED_CACHE_DIR=", f.dir / "cache", " ", ctl, " merge ", modules, " --anchor ",
                                  f.anchor_dir, " --out ", f.dir / "b", " --held-out ", f.dir / "held_out.txt",
                                  " --held-out-seq-len 64"),
                     &out) == 0);
  INFO(out);
  CHECK_THAT(out, Catch::Contains("on the held-out text (") && Catch::Contains("bits/byte where FlexFed scores"));
  REQUIRE(RunCommand(absl::StrCat(ctl, " merge ", modules, " --anchor ", f.anchor_dir, " --out ", f.dir / "c --no-bias"), &out) == 0);
  CHECK_THAT(out, Catch::Contains("exact: transformers"));
}

}  // namespace
}  // namespace flexfed
