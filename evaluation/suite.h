// The evaluation suite (docs/METHOD.md §5 in miniature): bits per byte on each domain's held-out text
// for the public anchor, each owner's two-expert model, model soup, BTM, FlexOlmo merged, its
// ablations (no negative bias, random router init, no coordination) and each opt-out; the routing
// of the merged model per domain and layer; and the checks the demo must pass. docs/EVALUATION.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include <nlohmann/json.hpp>

namespace flexfed {

struct SuiteDomain {
  std::string name;
  std::string heldout;  // text file, .jsonl or folder
};

struct SuiteOwner {
  std::string name;    // e.g. "code"
  std::string domain;  // which SuiteDomain is this owner's
  std::string module;  // the expert module the owner pushed
  std::string random_init_module;  // optional: the same training with a random router init
  std::string dense_module;        // optional: `train --dense` (no coordination)
  std::string no_bias_module;      // optional: the same training without the negative bias (`train --router-bias false`)
};

struct SuiteSpec {
  std::string anchor;
  std::vector<SuiteDomain> domains;
  std::string public_domain = "public";
  std::vector<SuiteOwner> owners;
  std::vector<int64_t> top_k = {0};  // merged rows, one per k (0 = every expert)
  int64_t seq_len = 256;
  int64_t max_sequences = 32;  // per domain
  int64_t batch_size = 8;
  int64_t btm_prefix = 32;
  double btm_tau = 1.0;
  std::string cache_dir;  // token cache; default DefaultTokenCacheDir()
  int threads = 0;

  static absl::StatusOr<SuiteSpec> FromJson(const nlohmann::json& j, const std::string& source);
};

// Runs everything; `log` (may be null) gets one line per model evaluated. The result holds
// "domains", "rows" (name, kind, bits_per_byte per domain, average), "routing" (per domain,
// [layer][expert] share of tokens whose highest-weighted expert it is), "checks" and "table"
// (markdown).
absl::StatusOr<nlohmann::json> RunSuite(const SuiteSpec& spec, const std::function<void(const std::string&)>& log);

}  // namespace flexfed
