// Format: docs/EXPERT_MODULE.md.
#include "common/core/expert_module.h"

#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/core/dp_accountant.h"
#include "common/core/file_util.h"
#include "common/core/sha256.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

absl::Status Reject(const std::string& reason, const std::string& message) {
  absl::Status s = absl::InvalidArgumentError(message);
  s.SetPayload(kRejectionPayload, absl::Cord(reason));
  return s;
}

std::string Name(int64_t layer, const char* what) { return absl::StrCat("layers.", layer, ".", what); }

}  // namespace

// The optional privacy record (untrusted: it comes from an owner): a JSON object. Its
// "extraction", when present, holds consistent counts and a rate in [0, 1]; its "dp" the whole
// DP-SGD setting, whose ε the accountant recomputes: a record claiming less privacy loss than
// its own noise, sampling rate and steps give, or a δ that protects nothing, is refused.
absl::Status CheckPrivacyRecord(const std::string& text) {
  if (text.size() > 64 * 1024) return absl::InvalidArgumentError("it is longer than 64 KiB");
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("it is not a JSON object");
  if (j.contains("extraction")) {
    const nlohmann::json& e = j["extraction"];
    if (!e.is_object() || !e.contains("audited") || !e.contains("extracted") || !e.contains("rate") ||
        !e.contains("complete") || !e["audited"].is_number_integer() || !e["extracted"].is_number_integer() ||
        !e["rate"].is_number() || !e["complete"].is_boolean()) {
      return absl::InvalidArgumentError("its extraction audit lacks integer audited/extracted, a numeric rate or complete");
    }
    const int64_t audited = e["audited"], extracted = e["extracted"];
    const double rate = e["rate"];
    if (audited < 1 || extracted < 0 || extracted > audited || !(rate >= 0 && rate <= 1) ||
        std::abs(rate - static_cast<double>(extracted) / static_cast<double>(audited)) > 1e-9) {
      return absl::InvalidArgumentError("its extraction audit's rate is not extracted / audited");
    }
  }
  if (j.contains("dp")) {
    const nlohmann::json& d = j["dp"];
    if (!d.is_object()) return absl::InvalidArgumentError("its dp record is not an object");
    for (const char* field : {"noise_multiplier", "max_grad_norm", "sampling_rate", "delta", "epsilon"}) {
      if (!d.contains(field) || !d[field].is_number() || !std::isfinite(d[field].get<double>())) {
        return absl::InvalidArgumentError(absl::StrCat("its dp record lacks a finite ", field));
      }
    }
    if (!d.contains("steps") || !d["steps"].is_number_integer()) return absl::InvalidArgumentError("its dp record lacks integer steps");
    const double sigma = d["noise_multiplier"], clip = d["max_grad_norm"], q = d["sampling_rate"];
    const double delta = d["delta"], epsilon = d["epsilon"];
    const int64_t steps = d["steps"];
    if (!(sigma > 0) || !(clip > 0)) return absl::InvalidArgumentError("its dp record has no noise (noise_multiplier and max_grad_norm must be > 0)");
    if (!(q > 0 && q <= 1) || steps < 1) return absl::InvalidArgumentError("its dp record's sampling_rate is not in (0, 1] or its steps not >= 1");
    if (!(delta > 0 && delta <= kMaxDpDelta)) {
      return absl::InvalidArgumentError(absl::StrFormat("its dp record's delta %g is not in (0, %g]: such a delta protects nothing", delta, kMaxDpDelta));
    }
    RdpAccountant accountant;
    accountant.Compose(q, sigma, steps);
    const double spent = accountant.Epsilon(delta).epsilon;
    // The record's ε as the accountant gives it (to 0.1%: written and read back as JSON numbers).
    if (!(std::abs(epsilon - spent) <= 1e-3 * spent + 1e-9)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "its dp record says epsilon %.6g, but its own noise_multiplier %.6g, sampling_rate %.6g, %d steps and delta %g "
          "give %.6g",
          epsilon, sigma, q, steps, delta, spent));
    }
  }
  return absl::OkStatus();
}

std::optional<double> ExtractionRate(const ExpertModuleMetadata& metadata) {
  if (metadata.privacy.empty()) return std::nullopt;
  const nlohmann::json j = nlohmann::json::parse(metadata.privacy, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("extraction")) return std::nullopt;
  const nlohmann::json& e = j["extraction"];
  if (!e.is_object() || !e.value("complete", false) || !e.contains("rate") || !e["rate"].is_number()) return std::nullopt;
  return e["rate"].get<double>();
}

std::optional<double> DpEpsilon(const ExpertModuleMetadata& metadata) {
  if (metadata.privacy.empty()) return std::nullopt;
  const nlohmann::json j = nlohmann::json::parse(metadata.privacy, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("dp")) return std::nullopt;
  const nlohmann::json& d = j["dp"];
  if (!d.is_object() || !d.contains("epsilon") || !d["epsilon"].is_number()) return std::nullopt;
  return d["epsilon"].get<double>();
}

std::string PolicyFingerprint(const PrivacyPolicy& policy) {
  if (policy.empty()) return "none";
  std::string out;
  if (policy.max_dp_epsilon) out += absl::StrFormat("max_dp_epsilon=%.17g;", *policy.max_dp_epsilon);
  if (policy.max_extraction) out += absl::StrFormat("max_extraction=%.17g;", *policy.max_extraction);
  return out;
}

absl::Status CheckPrivacyPolicy(const ExpertModuleMetadata& metadata, const PrivacyPolicy& policy) {
  if (policy.max_extraction) {
    const std::optional<double> rate = ExtractionRate(metadata);
    if (!rate) {
      return Reject("privacy_policy", absl::StrFormat(
          "an extraction audit with a rate of at most %.4f is required and the module records no complete audit; run "
          "`flexfed-owner audit --run RUN --data YOUR_DATA`, then export again",
          *policy.max_extraction));
    }
    // (ExtractionRate found a complete audit: the record parses and holds an "extraction" object.)
    const nlohmann::json audit = nlohmann::json::parse(metadata.privacy, nullptr, /*allow_exceptions=*/false)["extraction"];
    const int64_t audited = audit.contains("audited") && audit["audited"].is_number_integer() ? audit["audited"].get<int64_t>() : 0;
    if (audited < kMinAuditedSequences) {
      return Reject("privacy_policy", absl::StrFormat(
          "the module's extraction audit covered %d sequence(s); at least %d are needed for its rate to mean anything; run "
          "`flexfed-owner audit --run RUN --data YOUR_DATA --samples 1000`, then export again",
          audited, kMinAuditedSequences));
    }
    if (*rate > *policy.max_extraction) {
      return Reject("privacy_policy", absl::StrFormat(
          "the module's extraction rate %.4f exceeds the allowed %.4f; train with differential privacy "
          "(--dp-epsilon) or on deduplicated data, audit and export again",
          *rate, *policy.max_extraction));
    }
  }
  if (policy.max_dp_epsilon) {
    const std::optional<double> epsilon = DpEpsilon(metadata);
    if (!epsilon) {
      return Reject("privacy_policy", absl::StrFormat(
          "training with differential privacy at ε ≤ %g is required and the module records none; train with "
          "`flexfed-owner train --dp-epsilon %g --dp-max-grad-norm C`, then export again",
          *policy.max_dp_epsilon, *policy.max_dp_epsilon));
    }
    if (*epsilon > *policy.max_dp_epsilon) {
      return Reject("privacy_policy", absl::StrFormat(
          "the module was trained at ε = %.3g, above the allowed %g; train again with `--dp-epsilon %g` (or less)",
          *epsilon, *policy.max_dp_epsilon, *policy.max_dp_epsilon));
    }
  }
  return absl::OkStatus();
}

std::string RejectionReason(const absl::Status& status) {
  absl::optional<absl::Cord> p = status.GetPayload(kRejectionPayload);
  return p ? std::string(*p) : std::string();
}

std::string ConfigHash(const ModelConfig& config) {
  nlohmann::json j = {{"model_type", "flexfed-anchor"},
                      {"vocab_size", config.vocab_size},
                      {"hidden_size", config.hidden_size},
                      {"intermediate_size", config.intermediate_size},
                      {"num_hidden_layers", config.num_hidden_layers},
                      {"num_attention_heads", config.num_attention_heads},
                      {"num_key_value_heads", config.num_key_value_heads},
                      {"head_dim", config.head_dim},
                      {"rope_theta", config.rope_theta},
                      {"rms_norm_eps", config.rms_norm_eps},
                      {"tie_word_embeddings", config.tie_word_embeddings}};
  return Sha256Hex(j.dump());
}

std::vector<AllowedTensor> ExpertModuleAllowList(const ModelConfig& c, Dtype ffn_dtype, bool with_bias) {
  std::vector<AllowedTensor> out;
  const int64_t h = c.hidden_size, f = c.intermediate_size;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    out.push_back({Name(l, "gate_proj.weight"), ffn_dtype, {f, h}});
    out.push_back({Name(l, "up_proj.weight"), ffn_dtype, {f, h}});
    out.push_back({Name(l, "down_proj.weight"), ffn_dtype, {h, f}});
    out.push_back({Name(l, "router.weight"), Dtype::kF32, {h}});
    if (with_bias) out.push_back({Name(l, "router.bias"), Dtype::kF32, {1}});
  }
  return out;
}

namespace {

// Whether every element of a floating-point tensor's little-endian bytes is finite.
bool AllFinite(Dtype dtype, const uint8_t* p, uint64_t bytes) {
  switch (dtype) {
    case Dtype::kF32:
      for (uint64_t i = 0; i + 4 <= bytes; i += 4) {
        uint32_t u;
        std::memcpy(&u, p + i, 4);
        if ((u & 0x7f800000u) == 0x7f800000u) return false;
      }
      return true;
    case Dtype::kBF16:
    case Dtype::kF16: {
      const uint16_t exponent = dtype == Dtype::kBF16 ? 0x7f80 : 0x7c00;
      for (uint64_t i = 0; i + 2 <= bytes; i += 2) {
        uint16_t u;
        std::memcpy(&u, p + i, 2);
        if ((u & exponent) == exponent) return false;
      }
      return true;
    }
    case Dtype::kF64:
      for (uint64_t i = 0; i + 8 <= bytes; i += 8) {
        uint64_t u;
        std::memcpy(&u, p + i, 8);
        if ((u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull) return false;
      }
      return true;
    default:
      return true;
  }
}

}  // namespace

absl::StatusOr<ExpertModuleMetadata> ValidateExpertModule(const std::string& path, const ModelConfig& config,
                                                          Dtype ffn_dtype, const std::string& expected_anchor) {
  absl::StatusOr<std::shared_ptr<MappedFile>> mapped = MappedFile::Open(path);
  if (!mapped.ok()) return Reject("format", std::string(mapped.status().message()));
  absl::StatusOr<SafetensorsLayout> layout = ParseSafetensors(path, (*mapped)->data(), (*mapped)->size());
  if (!layout.ok()) return Reject("format", std::string(layout.status().message()));
  std::map<std::string, const TensorInfo*> by_name;
  for (const TensorInfo& t : layout->tensors) by_name[t.name] = &t;
  const auto& meta = layout->metadata;
  auto get = [&](const char* key) -> std::string {
    auto it = meta.find(key);
    return it == meta.end() ? std::string() : it->second;
  };
  if (get("format") != kExpertModuleFormat || get("format_version") != kExpertModuleVersion) {
    return Reject("format", absl::StrCat(path, ": not a FlexFed expert module (format '", get("format"), "' version '",
                                         get("format_version"), "'); export it with `flexfed-owner export`"));
  }
  ExpertModuleMetadata m;
  m.anchor_sha256 = get("anchor_sha256");
  m.config_hash = get("config_hash");
  m.owner = get("owner");
  m.expert_name = get("expert_name");
  m.domain = get("domain");
  m.router_init = get("router_init");
  m.privacy = get("privacy");
  const std::string tokens = get("tokens_trained");
  // tokens_trained: decimal digits that fit an int64 (parsed without exceptions: 20 nines is bad
  // input, not an internal error).
  if (m.anchor_sha256.size() != 64 || m.config_hash.size() != 64 || tokens.empty() ||
      tokens.find_first_not_of("0123456789") != std::string::npos || !absl::SimpleAtoi(tokens, &m.tokens_trained)) {
    return Reject("metadata", absl::StrCat(path, ": metadata lacks a valid anchor_sha256, config_hash or tokens_trained"));
  }
  if (!m.privacy.empty()) {
    if (absl::Status s = CheckPrivacyRecord(m.privacy); !s.ok()) {
      return Reject("metadata", absl::StrCat(path, ": metadata 'privacy' is not a valid privacy record: ", s.message(),
                                             " (docs/EXPERT_MODULE.md); export the module again"));
    }
  }
  if (!expected_anchor.empty() && m.anchor_sha256 != expected_anchor) {
    return Reject("anchor_mismatch", absl::StrCat(path, ": trained against anchor ", m.anchor_sha256.substr(0, 12),
                                                  "…, not ", expected_anchor.substr(0, 12),
                                                  "…; retrain against the current anchor"));
  }
  if (m.config_hash != ConfigHash(config)) {
    return Reject("config_mismatch", absl::StrCat(path, ": config_hash does not match the anchor's model config"));
  }

  const bool with_bias = by_name.count(Name(0, "router.bias")) > 0;
  std::set<std::string> allowed;
  for (const AllowedTensor& a : ExpertModuleAllowList(config, ffn_dtype, with_bias)) {
    allowed.insert(a.name);
    auto found = by_name.find(a.name);
    const TensorInfo* info = found == by_name.end() ? nullptr : found->second;
    if (info == nullptr) {
      return Reject("missing_tensor", absl::StrCat(path, ": missing tensor '", a.name, "'"));
    }
    if (info->dtype != a.dtype) {
      return Reject("dtype", absl::StrCat(path, ": tensor '", a.name, "' is ", DtypeName(info->dtype), ", must be ",
                                          DtypeName(a.dtype)));
    }
    if (info->shape != a.shape) {
      return Reject("shape", absl::StrCat(path, ": tensor '", a.name, "' has shape ", ShapeString(info->shape),
                                          ", must be ", ShapeString(a.shape)));
    }
    const uint8_t* bytes = (*mapped)->data() + layout->data_offset + info->begin;
    const bool finite = AllFinite(info->dtype, bytes, info->end - info->begin);
    ReleaseMappedPages(bytes, info->end - info->begin);  // a 7B module is 8.7 GB: checked tensor by tensor
    if (!finite) return Reject("non_finite", absl::StrCat(path, ": tensor '", a.name, "' holds NaN or infinity"));
  }
  for (const auto& [name, _] : by_name) {
    if (!allowed.count(name)) {
      return Reject("unexpected_tensor", absl::StrCat(path, ": tensor '", name,
                                                      "' is not part of an expert module; nothing but the expert's "
                                                      "FFN, router row and bias may leave the premises"));
    }
  }
  return m;
}

}  // namespace flexfed
