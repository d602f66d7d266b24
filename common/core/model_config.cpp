#include "common/core/model_config.h"

#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"

namespace flexfed {
namespace {

using nlohmann::json;

// Fields with no effect on what FlexFed computes; kept verbatim for the round trip.
const std::set<std::string>& PassthroughKeys() {
  static const std::set<std::string> keys = {
      "architectures", "transformers_version", "initializer_range", "use_cache",
      "output_router_logits", "router_aux_loss_coef", "_name_or_path", "tokenizer_class",
      "auto_map", "return_dict", "output_hidden_states", "output_attentions", "is_decoder",
      "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "torchscript"};
  return keys;
}

absl::Status Bad(const std::string& source, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
}

absl::Status Unsupported(const std::string& source, absl::string_view key, absl::string_view what) {
  return Bad(source, absl::StrCat("'", key, "' ", what,
                                  ", which FlexFed does not implement; use a checkpoint without it"));
}

absl::StatusOr<int64_t> GetInt(const json& j, const std::string& source, const char* key,
                               std::optional<int64_t> fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return Bad(source, absl::StrCat("missing required field '", key, "'"));
  }
  if (!it->is_number_integer()) return Bad(source, absl::StrCat("'", key, "' must be an integer"));
  return it->get<int64_t>();
}

absl::StatusOr<std::optional<int64_t>> GetOptionalTokenId(const json& j, const std::string& source, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::optional<int64_t>();
  if (!it->is_number_integer() || it->get<int64_t>() < 0) {
    return Bad(source, absl::StrCat("'", key, "' must be a non-negative integer or null"));
  }
  return std::optional<int64_t>(it->get<int64_t>());
}

}  // namespace

absl::Status ModelConfig::Validate() const {
  const std::string src = "config";
  if (model_type != "olmo2" && model_type != "flex_olmo") {
    return Bad(src, absl::StrCat("model_type '", model_type, "' is not olmo2 or flex_olmo"));
  }
  struct { const char* name; int64_t value; } positive[] = {
      {"vocab_size", vocab_size}, {"hidden_size", hidden_size}, {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers}, {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads}, {"head_dim", head_dim},
      {"max_position_embeddings", max_position_embeddings}, {"num_experts", num_experts},
      {"num_experts_per_tok", num_experts_per_tok}};
  for (const auto& p : positive) {
    if (p.value <= 0) return Bad(src, absl::StrCat("'", p.name, "' must be positive, got ", p.value));
  }
  if (num_attention_heads % num_key_value_heads != 0) {
    return Bad(src, absl::StrCat("num_attention_heads (", num_attention_heads,
                                 ") must be a multiple of num_key_value_heads (", num_key_value_heads, ")"));
  }
  if (head_dim % 2 != 0) return Bad(src, absl::StrCat("head_dim must be even for RoPE, got ", head_dim));
  if (num_experts_per_tok > num_experts) {
    return Bad(src, absl::StrCat("num_experts_per_tok (", num_experts_per_tok, ") exceeds num_experts (",
                                 num_experts, ")"));
  }
  if (model_type == "olmo2" && num_experts != 1) return Bad(src, "an olmo2 model has exactly one (dense) expert");
  if (!(rope_theta > 0)) return Bad(src, "rope_theta must be positive");
  if (!(rms_norm_eps > 0)) return Bad(src, "rms_norm_eps must be positive");
  if (torch_dtype != "float32" && torch_dtype != "bfloat16" && torch_dtype != "float16") {
    return Bad(src, absl::StrCat("torch_dtype '", torch_dtype, "' is not float32, bfloat16 or float16"));
  }
  for (auto id : {pad_token_id, bos_token_id}) {
    if (id && *id >= vocab_size) return Bad(src, absl::StrCat("token id ", *id, " is outside the vocabulary"));
  }
  for (int64_t id : eos_token_ids) {
    if (id < 0 || id >= vocab_size) return Bad(src, absl::StrCat("eos token id ", id, " is outside the vocabulary"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const json& j, const std::string& source) {
  if (!j.is_object()) return Bad(source, "not a JSON object");
  ModelConfig c;
  auto type_it = j.find("model_type");
  if (type_it == j.end() || !type_it->is_string()) return Bad(source, "missing 'model_type'");
  c.model_type = type_it->get<std::string>();
  if (c.model_type != "olmo2" && c.model_type != "flex_olmo") {
    return Bad(source, absl::StrCat("model_type '", c.model_type,
                                    "' is not supported; FlexFed reads olmo2 and flex_olmo checkpoints"));
  }

  static const std::set<std::string> kKnown = {
      "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
      "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
      "rope_parameters", "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
      "attention_dropout", "hidden_act", "num_experts", "num_local_experts", "num_experts_per_tok",
      "norm_topk_prob", "pad_token_id", "bos_token_id", "eos_token_id", "torch_dtype", "dtype",
      "sliding_window", "use_sliding_window", "layer_types", "clip_qkv"};
  for (const auto& [key, value] : j.items()) {
    if (PassthroughKeys().count(key)) {
      c.passthrough[key] = value;
    } else if (!kKnown.count(key)) {
      return Bad(source, absl::StrCat("unknown field '", key,
                                      "'; FlexFed refuses what it does not implement (remove the field if it "
                                      "has no effect on the model)"));
    }
  }

#define FLEXFED_ASSIGN_INT(field, fallback)                                  \
  {                                                                          \
    absl::StatusOr<int64_t> v = GetInt(j, source, #field, fallback);         \
    if (!v.ok()) return v.status();                                          \
    c.field = *v;                                                            \
  }
  FLEXFED_ASSIGN_INT(vocab_size, std::nullopt);
  FLEXFED_ASSIGN_INT(hidden_size, std::nullopt);
  FLEXFED_ASSIGN_INT(intermediate_size, std::nullopt);
  FLEXFED_ASSIGN_INT(num_hidden_layers, std::nullopt);
  FLEXFED_ASSIGN_INT(num_attention_heads, std::nullopt);
  FLEXFED_ASSIGN_INT(num_key_value_heads, c.num_attention_heads);
  FLEXFED_ASSIGN_INT(max_position_embeddings, 4096);
  if (c.num_attention_heads > 0 && !j.contains("head_dim") && c.hidden_size % c.num_attention_heads != 0) {
    return Bad(source, "hidden_size is not a multiple of num_attention_heads and no head_dim is given");
  }
  FLEXFED_ASSIGN_INT(head_dim, c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0);
  if (c.model_type == "flex_olmo") {
    // HF's FlexOlmoConfig defaults: 7 experts, 5 per token.
    const char* experts_key = j.contains("num_experts") ? "num_experts" : "num_local_experts";
    absl::StatusOr<int64_t> experts = GetInt(j, source, experts_key, 7);
    if (!experts.ok()) return experts.status();
    c.num_experts = *experts;
    FLEXFED_ASSIGN_INT(num_experts_per_tok, 5);
  } else {
    for (const char* key : {"num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob"}) {
      if (j.contains(key) && !j[key].is_null()) {
        return Bad(source, absl::StrCat("'", key, "' appears in an olmo2 (dense) config; use model_type flex_olmo"));
      }
    }
  }
#undef FLEXFED_ASSIGN_INT

  // RoPE: `rope_theta`, or the newer `rope_parameters` {rope_type, rope_theta}. Only the default
  // (unscaled) type is implemented.
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    return Unsupported(source, "rope_scaling", "asks for scaled RoPE");
  }
  bool have_theta = false;
  if (auto it = j.find("rope_theta"); it != j.end() && !it->is_null()) {
    if (!it->is_number()) return Bad(source, "'rope_theta' must be a number");
    c.rope_theta = it->get<double>();
    have_theta = true;
  }
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return Bad(source, "'rope_parameters' must be an object");
    if (auto type = it->find("rope_type"); type != it->end() && *type != "default") {
      return Unsupported(source, "rope_parameters.rope_type", absl::StrCat("is ", type->dump()));
    }
    for (const auto& [key, value] : it->items()) {
      if (key == "rope_type") {
        continue;  // checked above
      } else if (key == "rope_theta") {
        if (!value.is_number()) return Bad(source, "'rope_parameters.rope_theta' must be a number");
        if (have_theta && value.get<double>() != c.rope_theta) {
          return Bad(source, "'rope_theta' and 'rope_parameters.rope_theta' disagree");
        }
        c.rope_theta = value.get<double>();
        have_theta = true;
      } else {
        return Unsupported(source, absl::StrCat("rope_parameters.", key), "is set");
      }
    }
    c.rope_as_parameters = true;
  }

  if (auto it = j.find("rms_norm_eps"); it != j.end() && !it->is_null()) {
    if (!it->is_number()) return Bad(source, "'rms_norm_eps' must be a number");
    c.rms_norm_eps = it->get<double>();
  }
  auto get_bool = [&](const char* key, bool fallback) -> absl::StatusOr<bool> {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) return Bad(source, absl::StrCat("'", key, "' must be true or false"));
    return it->get<bool>();
  };
  if (auto v = get_bool("tie_word_embeddings", false); v.ok()) c.tie_word_embeddings = *v; else return v.status();
  if (auto v = get_bool("norm_topk_prob", false); v.ok()) c.norm_topk_prob = *v; else return v.status();
  if (auto v = get_bool("attention_bias", false); !v.ok()) {
    return v.status();
  } else if (*v) {
    return Unsupported(source, "attention_bias", "is true (biases on attention projections)");
  }
  if (auto v = get_bool("use_sliding_window", false); !v.ok()) {
    return v.status();
  } else if (*v) {
    return Unsupported(source, "use_sliding_window", "is true");
  }
  if (auto it = j.find("sliding_window"); it != j.end() && !it->is_null()) {
    return Unsupported(source, "sliding_window", "is set (sliding-window attention)");
  }
  if (auto it = j.find("layer_types"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) return Bad(source, "'layer_types' must be a list");
    for (const json& t : *it) {
      if (t != "full_attention") return Unsupported(source, "layer_types", absl::StrCat("contains ", t.dump()));
    }
  }
  if (auto it = j.find("clip_qkv"); it != j.end() && !it->is_null()) {
    return Unsupported(source, "clip_qkv", "is set");
  }
  if (auto it = j.find("attention_dropout"); it != j.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() != 0.0) {
      return Unsupported(source, "attention_dropout", "is not 0 (attention dropout)");
    }
  }
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null()) {
    if (*it != "silu") return Unsupported(source, "hidden_act", absl::StrCat("is ", it->dump(), " (only silu)"));
  }

  if (auto v = GetOptionalTokenId(j, source, "pad_token_id"); v.ok()) c.pad_token_id = *v; else return v.status();
  if (auto v = GetOptionalTokenId(j, source, "bos_token_id"); v.ok()) c.bos_token_id = *v; else return v.status();
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    if (it->is_array()) {
      c.eos_is_list = true;
      for (const json& id : *it) {
        if (!id.is_number_integer()) return Bad(source, "'eos_token_id' entries must be integers");
        c.eos_token_ids.push_back(id.get<int64_t>());
      }
    } else if (it->is_number_integer()) {
      c.eos_token_ids.push_back(it->get<int64_t>());
    } else {
      return Bad(source, "'eos_token_id' must be an integer, a list of integers, or null");
    }
  }
  for (const char* key : {"torch_dtype", "dtype"}) {
    if (auto it = j.find(key); it != j.end() && !it->is_null()) {
      if (!it->is_string()) return Bad(source, absl::StrCat("'", key, "' must be a string"));
      c.torch_dtype = it->get<std::string>();
    }
  }
  if (absl::Status s = c.Validate(); !s.ok()) {
    return Bad(source, s.message().substr(8));  // drop "config: "
  }
  return c;
}

json ModelConfig::ToJson() const {
  json j = passthrough;
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  if (rope_as_parameters) {
    j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", rope_theta}};
  } else {
    j["rope_theta"] = rope_theta;
  }
  j["rms_norm_eps"] = rms_norm_eps;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["hidden_act"] = "silu";
  if (is_moe()) {
    j["num_experts"] = num_experts;
    j["num_experts_per_tok"] = num_experts_per_tok;
    j["norm_topk_prob"] = norm_topk_prob;
  }
  j["pad_token_id"] = pad_token_id ? json(*pad_token_id) : json(nullptr);
  j["bos_token_id"] = bos_token_id ? json(*bos_token_id) : json(nullptr);
  if (eos_token_ids.empty()) {
    j["eos_token_id"] = nullptr;
  } else if (eos_is_list || eos_token_ids.size() > 1) {
    j["eos_token_id"] = eos_token_ids;
  } else {
    j["eos_token_id"] = eos_token_ids[0];
  }
  j["torch_dtype"] = torch_dtype;
  // vLLM picks the model class by `architectures` (transformers by model_type): it follows the
  // model type, whatever a source config said (a merge turns an olmo2 anchor into flex_olmo).
  j["architectures"] = {is_moe() ? "FlexOlmoForCausalLM" : "Olmo2ForCausalLM"};
  return j;
}

absl::StatusOr<ModelConfig> ModelConfig::Preset(const std::string& name, int64_t num_experts, int64_t top_k) {
  struct Size { const char* name; int64_t layers, hidden, heads, ffn, vocab; };
  static constexpr Size kSizes[] = {
      {"test", 2, 64, 4, 176, 259},        {"mini", 4, 128, 4, 344, 259},       {"tiny", 4, 256, 4, 688, 259},
      {"small", 8, 512, 8, 1376, 259},     {"1b", 16, 2048, 16, 8192, 100352},
      {"7b", 32, 4096, 32, 11008, 100352},
  };
  for (const Size& s : kSizes) {
    if (name != s.name) continue;
    ModelConfig c;
    c.model_type = num_experts > 1 ? "flex_olmo" : "olmo2";
    c.num_hidden_layers = s.layers;
    c.hidden_size = s.hidden;
    c.num_attention_heads = s.heads;
    c.num_key_value_heads = s.heads;
    c.head_dim = s.hidden / s.heads;
    c.intermediate_size = s.ffn;
    c.vocab_size = s.vocab;
    c.num_experts = num_experts;
    c.num_experts_per_tok = num_experts > 1 ? top_k : 1;
    if (s.vocab == 259) {  // the byte tokenizer: 256 bytes, then BOS, EOS, PAD (common/model/tokenizer.h)
      c.bos_token_id = 256;
      c.eos_token_ids = {257};
      c.pad_token_id = 258;
    } else {  // dolma2 ids, as in OLMo-2
      c.eos_token_ids = {100257};
      c.pad_token_id = 100277;
    }
    if (absl::Status st = c.Validate(); !st.ok()) return st;
    return c;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown model size '", name, "'; choose test, mini, tiny, small, 1b or 7b"));
}

absl::StatusOr<ModelConfig> ReadModelConfig(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(path, "not valid JSON");
  return ModelConfig::FromJson(j, path);
}

absl::Status WriteModelConfig(const std::string& path, const ModelConfig& config) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  return WriteFileAtomically(path, config.ToJson().dump(2) + "\n");
}

}  // namespace flexfed
