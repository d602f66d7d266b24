// `flexfedctl logits` run as a real process on the oracle's checkpoints (ctl/logits_command.cpp):
// what transformers computes on the checkpoints it saved (tests/oracle/hf_model_cases.py).
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/model/checkpoint.h"
#include "common/core/file_util.h"
#include "tests/oracle/oracle.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::kOracleCases;
using testing::OracleCase;
using testing::OracleCaseDir;
using testing::OracleExpected;
using testing::RelativeError;
using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

std::string Ctl() { return testing::BinaryFromEnv("FLEXFED_CTL"); }

int Run(const std::string& command, std::string* output = nullptr) { return testing::RunCommand(command, output); }

TEST_CASE("flexfedctl logits reproduces transformers' logits for olmo2 and flex_olmo, F32 and BF16", "[cli]") {
  for (const OracleCase& c : kOracleCases) {
    INFO(c.name);
    TempDir dir;
    const std::string model = OracleCaseDir(c.name);
    const std::string expected_path = model + "/expected.safetensors";
    std::string out;
    REQUIRE(Run(absl::StrCat(Ctl(), " logits ", model, " --ids-file ", expected_path, " --threads 1 -o ", dir / "l.safetensors"), &out) == 0);
    auto got = ValueOrDie(SafetensorsFile::Open(dir / "l.safetensors"));
    auto expected = OracleExpected(c.name);
    at::Tensor logits = ValueOrDie(got->Get("logits"));
    CHECK(logits.scalar_type() == at::kFloat);
    CHECK(RelativeError(logits, ValueOrDie(expected->Get("logits")).to(at::kFloat)) < c.tolerance);
    CHECK(at::equal(ValueOrDie(got->Get("ids")), ValueOrDie(expected->Get("ids"))));
    if (expected->Contains("logits_excluding_1")) {
      REQUIRE(Run(absl::StrCat(Ctl(), " logits ", model, " --ids-file ", expected_path, " --exclude 1 -o ", dir / "x.safetensors")) == 0);
      at::Tensor excluded = ValueOrDie(ValueOrDie(SafetensorsFile::Open(dir / "x.safetensors"))->Get("logits"));
      CHECK(RelativeError(excluded, ValueOrDie(expected->Get("logits_excluding_1")).to(at::kFloat)) < c.tolerance);
    }
  }
}

TEST_CASE("flexfedctl logits pads a ragged batch on the right without changing real positions", "[cli]") {
  TempDir dir;
  const std::string model = OracleCaseDir("flex_olmo_f32");
  REQUIRE(Run(absl::StrCat(Ctl(), " logits ", model, " --ids 5,6,7,8 --ids 9,10 -o ", dir / "b.safetensors")) == 0);
  REQUIRE(Run(absl::StrCat(Ctl(), " logits ", model, " --ids 9,10 -o ", dir / "one.safetensors")) == 0);
  auto batch = ValueOrDie(SafetensorsFile::Open(dir / "b.safetensors"));
  auto one = ValueOrDie(SafetensorsFile::Open(dir / "one.safetensors"));
  CHECK(at::equal(ValueOrDie(batch->Get("lengths")), at::tensor({4, 2}, at::kLong)));
  at::Tensor real = ValueOrDie(batch->Get("logits"))[1].narrow(0, 0, 2);
  CHECK(RelativeError(real, ValueOrDie(one->Get("logits"))[0]) < 1e-5);
}

TEST_CASE("flexfedctl logits refuses bad input with one line and exit code 1 or 2", "[cli]") {
  TempDir dir;
  const std::string model = OracleCaseDir("flex_olmo_f32");
  const std::string out = " -o " + dir / "o.safetensors";
  std::string msg;
  CHECK(Run(Ctl() + " logits " + model + " --ids 1,400" + out, &msg) == 1);
  CHECK_THAT(msg, Catch::Contains("token id 400 is outside the model's vocabulary"));
  CHECK(Run(Ctl() + " logits " + model + " --ids 1,x" + out, &msg) == 1);
  CHECK_THAT(msg, Catch::Contains("'x' is not a token id"));
  CHECK(Run(Ctl() + " logits " + model + " --ids 1 --exclude 9" + out, &msg) == 1);
  CHECK_THAT(msg, Catch::Contains("expert 9 does not exist"));
  CHECK(Run(Ctl() + " logits " + model + " --ids 1 --exclude 0 1 2 3" + out, &msg) == 1);
  CHECK_THAT(msg, Catch::Contains("allows no expert"));
  CHECK(Run(Ctl() + " logits " + dir.path() + " --ids 1" + out, &msg) == 1);
  CHECK_THAT(msg, Catch::Contains("config.json"));
  CHECK(Run(Ctl() + " logits " + model + out, &msg) == 1);
  CHECK_THAT(msg, Catch::Contains("no input"));
  CHECK(Run(Ctl() + " logits " + model + " --ids 1 --allow 0 --exclude 1" + out, &msg) == 2);
  CHECK(Run(Ctl() + " frobnicate", &msg) == 2);
  CHECK_FALSE(fs::exists(dir / "o.safetensors"));  // nothing written on failure
  CHECK(Run(Ctl() + " --help", &msg) == 0);
  CHECK_THAT(msg, Catch::Contains("logits"));
}

}  // namespace
}  // namespace flexfed
