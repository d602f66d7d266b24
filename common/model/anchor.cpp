#include "common/model/anchor.h"

#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace flexfed {

namespace fs = std::filesystem;

absl::StatusOr<Anchor> LoadAnchor(const std::string& dir, bool require_router_pub, std::optional<at::ScalarType> dtype) {
  absl::StatusOr<std::string> id = AnchorId(dir);
  if (!id.ok()) return id.status();
  absl::StatusOr<FlexOlmoModel> model = FlexOlmoModel::Load(dir, dtype);
  if (!model.ok()) return model.status();
  const ModelConfig& c = model->config();
  if (c.num_experts != 1) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": an anchor is a dense model (olmo2, or flex_olmo with one "
                                                   "expert); this one has ", c.num_experts, " experts"));
  }
  Anchor anchor{dir, *id, *std::move(model), {}};
  const std::string pub = (fs::path(dir) / kRouterPubFileName).string();
  if (fs::exists(pub)) {
    absl::StatusOr<RouterEmbedding> r = ReadRouterEmbedding(pub, c.num_hidden_layers, c.hidden_size);
    if (!r.ok()) return r.status();
    anchor.router_pub = *std::move(r);
  } else if (require_router_pub) {
    return absl::NotFoundError(absl::StrCat(dir, ": no ", kRouterPubFileName,
                                            " (r_pub) beside the anchor; the coordinator publishes it with the anchor "
                                            "(an operator makes it with `flexfed-owner router-init` on public data)"));
  }
  return anchor;
}

}  // namespace flexfed
