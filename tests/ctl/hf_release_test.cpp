// A FlexFed release is a Hugging Face checkpoint as it is: transformers' AutoModelForCausalLM
// loads what `flexfedctl merge` writes and computes what `flexfedctl logits` computes on it
// (tests/oracle/hf_release_logits.py). The coordinator's `release export` is checked the same way
// end to end in tests/coordinator/federation_test.cpp.
#include <catch2/catch.hpp>

#include <string>

#include "absl/strings/str_cat.h"
#include "tests/common/merge/federation_fixture.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::BinaryFromEnv;
using testing::Federation;
using testing::RunCommand;

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

}  // namespace
}  // namespace flexfed
