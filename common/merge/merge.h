// Merging (docs/METHOD.md §4): the anchor plus an ordered list of expert modules becomes one FlexOlmo
// model. Expert 0 is the anchor's (public) FFN, expert i the i-th module's; the router of layer L
// is [r_pub; r_1; …; r_n]; every other tensor is the anchor's. Each module is validated against
// the anchor first (allow-list, shapes, dtypes, finite values, anchor id). The owners' negative
// router biases go to FlexFed's side file (HF checkpoints cannot carry them).
//
// Memory: the anchor and the modules are memory-mapped and the merged model's tensors are views of
// those mappings (only the small router matrices [E, H] and biases [E] are new), and writing
// streams one tensor at a time, so a merge never holds the model twice.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/anchor.h"
#include "common/model/checkpoint.h"
#include "common/merge/expert_export.h"
#include "common/core/expert_module.h"
#include "common/model/model.h"

namespace flexfed {

struct MergeOptions {
  int64_t top_k = 0;             // num_experts_per_tok; 0 = every expert (E)
  bool with_router_bias = true;  // false: leave the negative biases out (the "no bias" ablation)
  std::string router_tuning;     // optional: routers tuned for exactly these modules (common/merge/router_tuning.h)
  uint64_t max_shard_bytes = kDefaultMaxShardBytes;
  std::map<std::string, std::string> extra_files;  // MergeToCheckpoint: name → contents, written along
};

struct MergedExpert {
  std::string path;
  std::string sha256;  // of the module file
  ExpertModuleMetadata metadata;
};

struct MergedModel {
  FlexOlmoModel model;                 // num_experts = modules + 1, router rows in that order
  std::string anchor_id;
  std::vector<MergedExpert> experts;   // router order: experts[i] is expert i + 1
};

// An expert module checked against its anchor; the tensors are views of the mapped file.
struct LoadedExpert {
  MergedExpert info;
  ExpertTensors tensors;
};

// Hashes, validates (against `anchor`) and maps each module once. `expected_sha256`, when not
// empty, holds the SHA-256 each module must have (a release's record); a mismatch is refused, as
// is a module listed twice.
absl::StatusOr<std::vector<LoadedExpert>> LoadExperts(const Anchor& anchor, const std::vector<std::string>& module_paths,
                                                      const std::vector<std::string>& expected_sha256 = {});

// Builds the merged model in memory from experts in router order (callers building several
// variants, like the evaluation suite, load the modules once).
absl::StatusOr<MergedModel> MergeExperts(const Anchor& anchor, const std::vector<LoadedExpert>& experts,
                                         const MergeOptions& options);
// LoadExperts + MergeExperts.
absl::StatusOr<MergedModel> MergeExperts(const Anchor& anchor, const std::vector<std::string>& module_paths,
                                         const MergeOptions& options,
                                         const std::vector<std::string>& expected_sha256 = {});

// Merges and writes the result to `out_dir` as an HF `flex_olmo` checkpoint (config.json,
// safetensors sharded past options.max_shard_bytes), the extras side file, the anchor's tokenizer
// files, and `flexfed_merge.json` (the anchor id and each expert's hash, owner, name and domain).
// The directory appears complete or not at all: it is written next to `out_dir` and renamed.
// `out_dir` must not exist yet.
absl::StatusOr<MergedModel> MergeToCheckpoint(const std::string& anchor_dir, const std::vector<std::string>& module_paths,
                                              const MergeOptions& options, const std::string& out_dir,
                                              const std::vector<std::string>& expected_sha256 = {});

// Writes `model` to `out_dir` (which must not exist) as a checkpoint directory together with the
// anchor's tokenizer files and `extra_files` (name → contents). The directory appears complete or
// not at all: it is written next to `out_dir` and renamed.
absl::Status WriteModelDirectory(const FlexOlmoModel& model, const std::string& anchor_dir, const std::string& out_dir,
                                 uint64_t max_shard_bytes, const std::map<std::string, std::string>& extra_files);

// Model soup (the paper's baseline): a dense model whose FFN in every layer is the element-wise
// mean of the modules' FFNs; everything else is the anchor's.
absl::StatusOr<FlexOlmoModel> SoupModel(const Anchor& anchor, const std::vector<LoadedExpert>& experts);

inline constexpr char kMergeRecordFileName[] = "flexfed_merge.json";

// Files of an anchor (or model) directory that describe its tokenizer; merges copy them along.
const std::vector<std::string>& TokenizerFileNames();

}  // namespace flexfed
