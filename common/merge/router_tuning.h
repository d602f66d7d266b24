// Router tuning (docs/METHOD.md §4, optional): after merging, only the routers — every layer's rows
// [E, H] and biases [E] — are trained on public proxy data (`flexfedctl router-tune`). The result is
// one file, versioned apart from the owners' modules: it names the anchor and the exact modules, in
// router order, it was tuned for, and a merge applies it only to that set. Opting an expert out
// still drops that expert's (tuned) row exactly; but the other rows were tuned with it present —
// the paper's caveat that tuning weakens the strict opt-out guarantee.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/model.h"

namespace flexfed {

inline constexpr char kRouterTuningFormat[] = "flexfed-router-tuning/1";

struct RouterTuning {
  std::string anchor_id;                  // SHA-256 identity of the anchor
  std::vector<std::string> experts;       // the modules' SHA-256, expert 1 .. E-1 in router order
  std::vector<at::Tensor> rows;           // per layer [E, H], fp32
  std::vector<at::Tensor> biases;         // per layer [E], fp32; empty when the merge has no biases
  std::map<std::string, std::string> metadata;  // how it was made (steps, tokens, data, lr)
};

// Atomic, byte-reproducible. Tensors "layers.L.router.weight" / ".bias"; metadata "format",
// "anchor_sha256", "experts" (JSON list) plus `metadata`.
absl::Status WriteRouterTuning(const std::string& path, const RouterTuning& tuning);
// Validates the format, the shapes (consistent across layers), finite values.
absl::StatusOr<RouterTuning> ReadRouterTuning(const std::string& path);

// Replaces the routers of `model` (a merge of `anchor_id` with modules `experts`, in this order)
// by the tuning's; refuses a tuning made for another anchor, another set or order of modules, or
// another shape, naming the difference.
absl::Status ApplyRouterTuning(const RouterTuning& tuning, const std::string& anchor_id,
                               const std::vector<std::string>& experts, FlexOlmoModel& model);

}  // namespace flexfed
