// The expert module: the only thing an owner's premises ever send (docs/ARCHITECTURE.md §7). One
// safetensors file with, per layer, the trained expert's FFN, its router row and (optionally) its
// negative bias, plus metadata binding it to one anchor. Spec: docs/EXPERT_MODULE.md.
// This header is the format and its validation (torch-free); common/merge/expert_export.h writes and
// extracts modules as tensors.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/core/model_config.h"
#include "common/core/safetensors.h"

namespace flexfed {

inline constexpr char kExpertModuleFormat[] = "flexfed-expert-module";
inline constexpr char kExpertModuleVersion[] = "1";
// Why a module was refused, as the payload "flexfed.reason" of the error status (for metrics and
// audit): format, missing_tensor, unexpected_tensor, shape, dtype, non_finite, metadata,
// anchor_mismatch, config_mismatch, privacy_policy.
inline constexpr char kRejectionPayload[] = "flexfed.reason";
std::string RejectionReason(const absl::Status& status);

struct ExpertModuleMetadata {
  std::string anchor_sha256;  // AnchorId() of the anchor it was trained against
  std::string config_hash;    // ConfigHash() of that anchor's config
  std::string owner;
  std::string expert_name;
  std::string domain;
  int64_t tokens_trained = 0;
  std::string router_init;  // anchor | vectors | random
  // Optional: what the owner measured about privacy (docs/EXPERT_MODULE.md, docs/PRIVACY.md), a
  // JSON object: "extraction" (the audit's summary: audited, extracted, rate, rate_95ci, complete,
  // settings) and/or "dp" (the differential-privacy settings and ε). "" = none.
  std::string privacy;
};

// Checks a privacy record (untrusted: the owner's) before anything reads it: a JSON object of at
// most 64 KiB whose "extraction" has consistent counts and whose "dp" is a whole DP-SGD setting
// with the ε the accountant gives for it and δ ≤ kMaxDpDelta (docs/EXPERT_MODULE.md). The error
// names the first problem.
absl::Status CheckPrivacyRecord(const std::string& text);

// The extraction rate recorded in `privacy`, when a complete audit is recorded there.
std::optional<double> ExtractionRate(const ExpertModuleMetadata& metadata);
// The differential-privacy ε recorded in `privacy` (the whole run's), when the expert was trained with DP.
std::optional<double> DpEpsilon(const ExpertModuleMetadata& metadata);

// What a module's privacy record must show before it is accepted: the owner's own gate (`push
// --max-extraction`) and the operator's (`flexfed-coordinator --max-extraction`, `--max-dp-epsilon`).
// Unset fields ask nothing.
// What a privacy record must hold to be read at all: δ of at most kMaxDpDelta (the accountant's
// ε means little above it), and for an extraction rate to meet a policy, an audit of at least
// kMinAuditedSequences sequences.
inline constexpr double kMaxDpDelta = 1e-3;
inline constexpr int64_t kMinAuditedSequences = 100;

struct PrivacyPolicy {
  std::optional<double> max_extraction;  // a complete extraction audit with at most this rate
  std::optional<double> max_dp_epsilon;  // trained with DP-SGD at ε at most this
  bool empty() const { return !max_extraction && !max_dp_epsilon; }
};
// OK when `metadata` meets `policy`; otherwise the rejection "privacy_policy" (kRejectionPayload)
// naming what the record lacks or exceeds and how the owner gets a module that passes.
absl::Status CheckPrivacyPolicy(const ExpertModuleMetadata& metadata, const PrivacyPolicy& policy);
// The policy as a canonical string ("none" when empty): two policies are the same exactly when
// their fingerprints are; a rejection records the one it was made under.
std::string PolicyFingerprint(const PrivacyPolicy& policy);

// SHA-256 of the fields of `config` that decide an expert's shapes and meaning.
std::string ConfigHash(const ModelConfig& config);

struct AllowedTensor {
  std::string name;
  Dtype dtype;
  std::vector<int64_t> shape;
};
// Every tensor a module for an anchor of `config` with weights of `ffn_dtype` holds, in order;
// the bias tensors (`layers.L.router.bias`) are all present or all absent.
std::vector<AllowedTensor> ExpertModuleAllowList(const ModelConfig& config, Dtype ffn_dtype, bool with_bias);

// Checks the module in `path` against the allow-list of `config` — exact names, dtypes and
// shapes, nothing else — finite values, complete metadata and, when given, the anchor id. Reads
// the file through a private mapping; torch-free, so the coordinator validates uploads with it.
absl::StatusOr<ExpertModuleMetadata> ValidateExpertModule(const std::string& path, const ModelConfig& config,
                                                          Dtype ffn_dtype, const std::string& expected_anchor_sha256 = "");

}  // namespace flexfed
