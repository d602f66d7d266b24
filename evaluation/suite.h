// The evaluation suite (docs/METHOD.md §5 in miniature): bits per byte on each domain's held-out text
// (single-domain and mixed-domain sequences) for the public anchor, each owner's two-expert model,
// each owner's dense expert, model soup, BTM (the paper's: public + dense experts, top-2; and ours
// of the two-expert models), FlexOlmo merged, its ablations (no negative bias, random router init,
// no coordination) and each opt-out; paired bootstrap intervals on the differences; the routing of
// the merged model per domain and layer; and the paper's claims checked. docs/EVALUATION.md.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include <nlohmann/json.hpp>

namespace flexfed {

struct SuiteDomain {
  std::string name;
  std::string heldout;  // text file, .jsonl or folder
  bool mixed = false;   // sequences that mix several domains: a column of their own, not in the average
};

struct SuiteOwner {
  std::string name;    // e.g. "code"
  std::string domain;  // which SuiteDomain is this owner's
  std::string module;  // the expert module the owner pushed
  std::string random_init_module;  // optional: the same training with a random router init
  std::string dense_module;        // optional: `train --dense` (no coordination)
  std::string no_bias_module;      // optional: the same training without the negative bias (`train --router-bias false`)
  std::string encoder_init_module;  // optional: the same training from sentence-encoder rows (scripts/router_vectors.py)
};

struct SuiteSpec {
  std::string anchor;
  std::vector<SuiteDomain> domains;
  std::string public_domain = "public";
  std::vector<SuiteOwner> owners;
  std::vector<int64_t> top_k = {0};  // merged rows, one per k (0 = every expert)
  std::string router_tuning;  // optional: `flexfedctl router-tune`'s file for the owners' modules (a row with it)
  int64_t seq_len = 256;
  int64_t max_sequences = 32;  // per domain
  int64_t batch_size = 8;
  int64_t btm_prefix = 32;
  double btm_tau = 1.0;
  int64_t btm_top_k = 2;       // the paper's BTM mixes the best 2 of public + dense experts
  int64_t bootstrap = 2000;    // resamples for the paired bootstrap intervals (95%)
  uint64_t bootstrap_seed = 1;
  std::string cache_dir;  // token cache; default DefaultTokenCacheDir()
  int threads = 0;

  static absl::StatusOr<SuiteSpec> FromJson(const nlohmann::json& j, const std::string& source);
};

// Per sequence of one domain: the NLL (nats) and UTF-8 bytes a model scored.
struct SequenceTotals {
  std::vector<double> nll, bytes;
};

// A relative difference with its 95% interval.
struct Interval {
  double estimate = 0, low = 0, high = 0;
};

// Paired bootstrap over sequences: the relative difference A / B − 1 of the mean over the given
// domains of bits per byte (one domain: that domain's). Each resample draws every domain's
// sequences with replacement, the same draw for A and B (they scored the same sequences); the
// interval is the 2.5th and 97.5th percentile. `a[d]` and `b[d]` are domain d's totals.
Interval PairedBootstrap(const std::vector<SequenceTotals>& a, const std::vector<SequenceTotals>& b, int64_t resamples,
                         uint64_t seed);

// Runs everything; `log` (may be null) gets one line per model evaluated. The result holds
// "domains", "mixed_domains", "rows" (name, kind, bits_per_byte per domain, average over the
// single-domain ones), "routing" (per domain, [layer][expert] share of tokens whose
// highest-weighted expert it is), "differences" (every row against the merged model, per domain
// and on average, with intervals), "checks" (the paper's claims, each with its interval) and
// "table", "differences_table" and "routing_table" (markdown).
absl::StatusOr<nlohmann::json> RunSuite(const SuiteSpec& spec, const std::function<void(const std::string&)>& log);

}  // namespace flexfed
