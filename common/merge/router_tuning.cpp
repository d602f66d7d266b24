#include "common/merge/router_tuning.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/model/checkpoint.h"

namespace flexfed {
namespace {

std::string WeightName(size_t l) { return absl::StrCat("layers.", l, ".router.weight"); }
std::string BiasName(size_t l) { return absl::StrCat("layers.", l, ".router.bias"); }

}  // namespace

absl::Status WriteRouterTuning(const std::string& path, const RouterTuning& t) {
  std::vector<NamedTensor> tensors;
  for (size_t l = 0; l < t.rows.size(); ++l) {
    tensors.push_back({WeightName(l), t.rows[l].detach().to(at::kCPU, at::kFloat).contiguous()});
    if (!t.biases.empty()) tensors.push_back({BiasName(l), t.biases[l].detach().to(at::kCPU, at::kFloat).contiguous()});
  }
  std::map<std::string, std::string> metadata = t.metadata;
  metadata["format"] = kRouterTuningFormat;
  metadata["anchor_sha256"] = t.anchor_id;
  metadata["experts"] = nlohmann::json(t.experts).dump();
  return WriteSafetensors(path, tensors, metadata);
}

absl::StatusOr<RouterTuning> ReadRouterTuning(const std::string& path) {
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", why, "; make it with `flexfedctl router-tune`"));
  };
  const std::map<std::string, std::string>& m = (*file)->metadata();
  auto format = m.find("format");
  if (format == m.end() || format->second != kRouterTuningFormat) return bad(absl::StrCat("not a ", kRouterTuningFormat, " file"));
  RouterTuning t;
  t.metadata = m;
  t.anchor_id = m.count("anchor_sha256") ? m.at("anchor_sha256") : "";
  const nlohmann::json experts = nlohmann::json::parse(m.count("experts") ? m.at("experts") : "", nullptr, false);
  if (t.anchor_id.empty() || !experts.is_array() || experts.empty()) return bad("metadata needs anchor_sha256 and a non-empty experts list");
  for (const auto& e : experts) {
    if (!e.is_string()) return bad("experts must be SHA-256 strings");
    t.experts.push_back(e.get<std::string>());
  }
  const int64_t num_experts = static_cast<int64_t>(t.experts.size()) + 1;
  for (size_t l = 0; (*file)->Contains(WeightName(l)); ++l) {
    absl::StatusOr<at::Tensor> w = (*file)->Get(WeightName(l));
    if (!w.ok()) return w.status();
    if (w->dim() != 2 || w->size(0) != num_experts || (l > 0 && w->size(1) != t.rows[0].size(1))) {
      return bad(absl::StrCat(WeightName(l), " must be [", num_experts, ", hidden], the same hidden size in every layer"));
    }
    t.rows.push_back(w->to(at::kFloat).clone());
    if ((*file)->Contains(BiasName(l))) {
      absl::StatusOr<at::Tensor> b = (*file)->Get(BiasName(l));
      if (!b.ok()) return b.status();
      if (b->dim() != 1 || b->size(0) != num_experts) return bad(absl::StrCat(BiasName(l), " must be [", num_experts, "]"));
      t.biases.push_back(b->to(at::kFloat).clone());
    }
  }
  if (t.rows.empty()) return bad("holds no router weights");
  if (!t.biases.empty() && t.biases.size() != t.rows.size()) return bad("has router biases for some layers only");
  for (size_t l = 0; l < t.rows.size(); ++l) {
    if (!t.rows[l].isfinite().all().item<bool>() || (!t.biases.empty() && !t.biases[l].isfinite().all().item<bool>())) {
      return bad(absl::StrCat("layer ", l, " holds a value that is not finite"));
    }
  }
  return t;
}

absl::Status ApplyRouterTuning(const RouterTuning& t, const std::string& anchor_id, const std::vector<std::string>& experts,
                               FlexOlmoModel& model) {
  if (t.anchor_id != anchor_id) {
    return absl::FailedPreconditionError(absl::StrCat("the router tuning was made for anchor ", t.anchor_id.substr(0, 16),
                                                      "…, not this one (", anchor_id.substr(0, 16), "…); tune again for it"));
  }
  if (t.experts != experts) {
    size_t i = 0;
    while (i < t.experts.size() && i < experts.size() && t.experts[i] == experts[i]) ++i;
    auto name = [](const std::vector<std::string>& v, size_t i) { return i < v.size() ? v[i].substr(0, 16) + "…" : "(none)"; };
    return absl::FailedPreconditionError(absl::StrCat(
        "the router tuning was made for other modules: expert ", i + 1, " is ", name(experts, i), " here and ",
        name(t.experts, i), " in the tuning; a tuning applies only to the exact modules, in order, it was tuned with "
        "(opt out at inference instead, or tune again)"));
  }
  const ModelConfig& c = model.config();
  if (static_cast<int64_t>(t.rows.size()) != c.num_hidden_layers || t.rows[0].size(1) != c.hidden_size) {
    return absl::FailedPreconditionError(absl::StrCat("the router tuning has ", t.rows.size(), " layers × ", t.rows[0].size(1),
                                                      "; the model ", c.num_hidden_layers, " × ", c.hidden_size));
  }
  std::vector<LayerWeights>& layers = model.mutable_layers();
  const bool has_bias = layers[0].router_bias.defined();
  if (has_bias != !t.biases.empty()) {
    return absl::FailedPreconditionError(has_bias ? "the router tuning has no biases but the merge has (merge with --no-bias?)"
                                                  : "the router tuning has biases but the merge has none (it was merged with --no-bias)");
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    layers[l].router = t.rows[l].to(layers[l].router.device(), layers[l].router.scalar_type());
    if (has_bias) layers[l].router_bias = t.biases[l].to(layers[l].router_bias.device(), layers[l].router_bias.scalar_type());
  }
  return absl::OkStatus();
}

}  // namespace flexfed
