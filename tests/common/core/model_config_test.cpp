// Specification of config.json handling (common/core/model_config.h).
#include <catch2/catch.hpp>

#include "common/core/model_config.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using nlohmann::json;
using testing::TempDir;
using testing::ValueOrDie;

// The fields of the released FlexOlmo-7x7B-1T config.json (HF flex_olmo).
json FlexOlmo7x7B() {
  return json::parse(R"({
    "architectures": ["FlexOlmoForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "flex_olmo",
    "norm_topk_prob": false, "num_attention_heads": 32, "num_experts": 7, "num_experts_per_tok": 7,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "output_router_logits": false,
    "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 500000,
    "router_aux_loss_coef": 0.01, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0", "use_cache": true, "vocab_size": 100352})");
}

std::string ErrorOf(const json& j) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(j, "config.json");
  return c.ok() ? "OK" : std::string(c.status().message());
}

TEST_CASE("reads a real flex_olmo config", "[config]") {
  ModelConfig c = ValueOrDie(ModelConfig::FromJson(FlexOlmo7x7B(), "config.json"));
  CHECK(c.is_moe());
  CHECK(c.num_experts == 7);
  CHECK(c.num_experts_per_tok == 7);
  CHECK(c.head_dim == 128);
  CHECK(c.num_key_value_heads == 32);
  CHECK(c.rope_theta == 500000.0);
  CHECK(c.eos_token_ids == std::vector<int64_t>{100257});
  CHECK(c.pad_token_id == 100277);
  CHECK_FALSE(c.bos_token_id.has_value());
  CHECK(c.torch_dtype == "bfloat16");
}

TEST_CASE("HF defaults apply to missing fields", "[config]") {
  json j = {{"model_type", "flex_olmo"}, {"vocab_size", 100}, {"hidden_size", 64}, {"intermediate_size", 128},
            {"num_hidden_layers", 2}, {"num_attention_heads", 4}};
  ModelConfig c = ValueOrDie(ModelConfig::FromJson(j, "config.json"));
  CHECK(c.num_experts == 7);          // FlexOlmoConfig default
  CHECK(c.num_experts_per_tok == 5);  // FlexOlmoConfig default
  CHECK(c.num_key_value_heads == 4);
  CHECK(c.head_dim == 16);
  CHECK(c.rope_theta == 500000.0);
  CHECK(c.rms_norm_eps == 1e-6);
}

TEST_CASE("rope_parameters form is read and written back", "[config]") {
  json j = FlexOlmo7x7B();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};
  ModelConfig c = ValueOrDie(ModelConfig::FromJson(j, "config.json"));
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.ToJson()["rope_parameters"]["rope_theta"] == 10000.0);
  CHECK_FALSE(c.ToJson().contains("rope_theta"));
}

TEST_CASE("a config survives write and read", "[config]") {
  TempDir dir;
  ModelConfig c = ValueOrDie(ModelConfig::FromJson(FlexOlmo7x7B(), "config.json"));
  REQUIRE(WriteModelConfig(dir / "config.json", c).ok());
  ModelConfig back = ValueOrDie(ReadModelConfig(dir / "config.json"));
  CHECK(back.ToJson() == c.ToJson());
  CHECK(back.ToJson()["transformers_version"] == "4.57.0");  // passthrough kept
  CHECK(back.ToJson()["eos_token_id"] == 100257);
}

TEST_CASE("olmo2 configs are the one-expert case", "[config]") {
  json j = FlexOlmo7x7B();
  j["model_type"] = "olmo2";
  for (const char* k : {"num_experts", "num_experts_per_tok", "norm_topk_prob"}) j.erase(k);
  ModelConfig c = ValueOrDie(ModelConfig::FromJson(j, "config.json"));
  CHECK_FALSE(c.is_moe());
  CHECK(c.num_experts == 1);
  CHECK(c.num_experts_per_tok == 1);
  CHECK_FALSE(c.ToJson().contains("num_experts"));
  CHECK(c.ToJson()["architectures"] == json::array({"Olmo2ForCausalLM"}));
}

TEST_CASE("an OLMo-2 7B config.json as published reads as it is, and matches the 7b preset's shape", "[config]") {
  const json j = json::parse(R"({
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": null, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "olmo2", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 500000,
    "tie_word_embeddings": false, "torch_dtype": "float32", "transformers_version": "4.47.0.dev0",
    "use_cache": true, "vocab_size": 100352})");
  ModelConfig c = ValueOrDie(ModelConfig::FromJson(j, "config.json"));
  ModelConfig preset = ValueOrDie(ModelConfig::Preset("7b"));
  CHECK(c.hidden_size == preset.hidden_size);
  CHECK(c.intermediate_size == preset.intermediate_size);
  CHECK(c.num_hidden_layers == preset.num_hidden_layers);
  CHECK(c.vocab_size == preset.vocab_size);
  CHECK(c.eos_token_ids == preset.eos_token_ids);
  CHECK(c.pad_token_id == preset.pad_token_id);
  CHECK(c.torch_dtype == "float32");
  CHECK_FALSE(c.bos_token_id.has_value());
}

TEST_CASE("architectures follows the model type, as vLLM picks the class by it", "[config]") {
  json j = FlexOlmo7x7B();
  j["model_type"] = "olmo2";
  j["architectures"] = {"Olmo2ForCausalLM"};
  for (const char* k : {"num_experts", "num_experts_per_tok", "norm_topk_prob"}) j.erase(k);
  ModelConfig c = ValueOrDie(ModelConfig::FromJson(j, "config.json"));
  c.model_type = "flex_olmo";  // what a merge of an olmo2 anchor does
  c.num_experts = 2;
  CHECK(c.ToJson()["architectures"] == json::array({"FlexOlmoForCausalLM"}));
}

TEST_CASE("what FlexFed does not implement is an error, never ignored", "[config]") {
  auto with = [](const char* key, json value) {
    json j = FlexOlmo7x7B();
    j[key] = std::move(value);
    return j;
  };
  CHECK_THAT(ErrorOf(with("rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}})), Catch::Contains("rope_scaling"));
  CHECK_THAT(ErrorOf(with("rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 1e4}})), Catch::Contains("rope_type"));
  CHECK_THAT(ErrorOf(with("attention_bias", true)), Catch::Contains("attention_bias"));
  CHECK_THAT(ErrorOf(with("sliding_window", 4096)), Catch::Contains("sliding_window"));
  CHECK_THAT(ErrorOf(with("hidden_act", "gelu")), Catch::Contains("hidden_act"));
  CHECK_THAT(ErrorOf(with("attention_dropout", 0.1)), Catch::Contains("attention_dropout"));
  CHECK_THAT(ErrorOf(with("clip_qkv", 8)), Catch::Contains("clip_qkv"));
  CHECK_THAT(ErrorOf(with("layer_types", {"sliding_attention"})), Catch::Contains("layer_types"));
  CHECK_THAT(ErrorOf(with("some_new_field", 1)), Catch::Contains("unknown field 'some_new_field'"));
  CHECK_THAT(ErrorOf(with("model_type", "llama")), Catch::Contains("model_type 'llama'"));
}

TEST_CASE("inconsistent configs are refused with the reason", "[config]") {
  auto with = [](const char* key, json value) {
    json j = FlexOlmo7x7B();
    j[key] = std::move(value);
    return j;
  };
  CHECK_THAT(ErrorOf(with("num_experts_per_tok", 8)), Catch::Contains("exceeds num_experts"));
  CHECK_THAT(ErrorOf(with("num_key_value_heads", 5)), Catch::Contains("multiple of num_key_value_heads"));
  CHECK_THAT(ErrorOf(with("hidden_size", -1)), Catch::Contains("hidden_size"));
  CHECK_THAT(ErrorOf(with("vocab_size", "big")), Catch::Contains("'vocab_size' must be an integer"));
  CHECK_THAT(ErrorOf(with("pad_token_id", 200000)), Catch::Contains("outside the vocabulary"));
  json missing = FlexOlmo7x7B();
  missing.erase("hidden_size");
  CHECK_THAT(ErrorOf(missing), Catch::Contains("missing required field 'hidden_size'"));
  CHECK_THAT(ErrorOf(missing), Catch::StartsWith("config.json: "));
}

TEST_CASE("presets follow docs/ARCHITECTURE.md section 8", "[config]") {
  ModelConfig tiny = ValueOrDie(ModelConfig::Preset("tiny"));
  CHECK(tiny.num_hidden_layers == 4);
  CHECK(tiny.hidden_size == 256);
  CHECK(tiny.intermediate_size == 688);
  CHECK(tiny.vocab_size == 259);
  CHECK_FALSE(tiny.is_moe());
  ModelConfig small = ValueOrDie(ModelConfig::Preset("small", 4, 2));
  CHECK(small.is_moe());
  CHECK(small.num_experts == 4);
  CHECK(small.num_experts_per_tok == 2);
  CHECK_FALSE(ModelConfig::Preset("huge").ok());
}

}  // namespace
}  // namespace flexfed
