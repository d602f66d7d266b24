// Format: docs/EXPERT_MODULE.md.
#include "common/merge/expert_export.h"

#include <map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"

namespace flexfed {
namespace {

std::string Name(int64_t layer, const char* what) { return absl::StrCat("layers.", layer, ".", what); }

}  // namespace

absl::Status WriteExpertModule(const std::string& path, const ExpertTensors& t, const ExpertModuleMetadata& m) {
  std::vector<NamedTensor> tensors;
  for (size_t l = 0; l < t.ffn.size(); ++l) {
    const int64_t layer = static_cast<int64_t>(l);
    tensors.push_back({Name(layer, "gate_proj.weight"), t.ffn[l].gate_proj.detach(), t.ffn_write_as});
    tensors.push_back({Name(layer, "up_proj.weight"), t.ffn[l].up_proj.detach(), t.ffn_write_as});
    tensors.push_back({Name(layer, "down_proj.weight"), t.ffn[l].down_proj.detach(), t.ffn_write_as});
    tensors.push_back({Name(layer, "router.weight"), t.router_rows[l].detach().to(at::kFloat).reshape({-1})});
    if (!t.router_bias.empty()) tensors.push_back({Name(layer, "router.bias"), t.router_bias[l].detach().to(at::kFloat).reshape({1})});
  }
  std::map<std::string, std::string> meta = {
      {"format", kExpertModuleFormat},       {"format_version", kExpertModuleVersion},
      {"anchor_sha256", m.anchor_sha256},    {"config_hash", m.config_hash},
      {"owner", m.owner},                    {"expert_name", m.expert_name},
      {"domain", m.domain},                  {"tokens_trained", std::to_string(m.tokens_trained)},
      {"router_init", m.router_init},
  };
  if (!m.privacy.empty()) meta["privacy"] = m.privacy;
  return WriteSafetensors(path, tensors, meta);
}

absl::StatusOr<ExpertTensors> ExtractExpert(const FlexOlmoModel& trained, const FlexOlmoModel& anchor,
                                            const RouterEmbedding& router_pub, const RouterEmbedding* dense_router_row) {
  const ModelConfig& tc = trained.config();
  const ModelConfig& ac = anchor.config();
  const bool dense = !tc.is_moe();
  if (ConfigHash(tc) != ConfigHash(ac) || (!dense && tc.num_experts != 2) || (dense && tc.num_experts != 1)) {
    return absl::InvalidArgumentError(
        "the trained model does not fit the anchor (other sizes, or not a two-expert model); export the model trained "
        "against this anchor");
  }
  if (dense && dense_router_row == nullptr) {
    return absl::InvalidArgumentError("a dense (--dense) model has no router: pass its router embedding with --router-init FILE");
  }
  // Frozen tensors, by the trained model's names → the anchor's.
  std::map<std::string, at::Tensor> anchor_by_name;
  for (const NamedTensor& nt : anchor.NamedParameters()) anchor_by_name[nt.name] = nt.tensor;
  std::vector<std::string> changed;
  for (const NamedTensor& nt : trained.NamedParameters()) {
    std::string name = nt.name;
    const bool expert1 = name.find(".mlp.experts.1.") != std::string::npos;
    const bool dense_ffn = dense && name.find(".mlp.") != std::string::npos;
    if (expert1 || dense_ffn || name.find(".mlp.router_bias") != std::string::npos) continue;
    if (name.find(".mlp.gate.weight") != std::string::npos) continue;  // router rows: checked below
    const size_t e0 = name.find(".mlp.experts.0.");
    if (e0 != std::string::npos && !ac.is_moe()) name.replace(e0, 15, ".mlp.");  // olmo2 anchor names
    auto it = anchor_by_name.find(name);
    if (it == anchor_by_name.end() || it->second.sizes() != nt.tensor.sizes() ||
        !at::equal(nt.tensor.detach().to(at::kCPU), it->second.to(at::kCPU, nt.tensor.scalar_type()))) {
      changed.push_back(nt.name);
    }
    // Compared once: both sides' mapped pages go back (a 7B model is read tensor by tensor).
    for (const at::Tensor& t : {nt.tensor, it == anchor_by_name.end() ? at::Tensor() : it->second}) {
      if (t.defined() && t.device().is_cpu() && t.is_contiguous()) ReleaseMappedPages(t.data_ptr(), t.nbytes());
    }
  }
  ExpertTensors out;
  out.ffn_write_as = anchor.dtype();
  for (int64_t l = 0; l < tc.num_hidden_layers; ++l) {
    const LayerWeights& lw = trained.layers()[l];
    if (!dense) {
      at::Tensor router = lw.router.detach().to(at::kCPU, at::kFloat);
      if (!at::equal(router[0], router_pub.rows[l].to(at::kFloat))) changed.push_back(absl::StrCat("model.layers.", l, ".mlp.gate.weight[0] (r_pub)"));
      out.router_rows.push_back(router[1].clone());
      if (lw.router_bias.defined()) out.router_bias.push_back(lw.router_bias.detach().to(at::kCPU, at::kFloat).narrow(0, 1, 1).clone());
    } else {
      out.router_rows.push_back(dense_router_row->rows[l].to(at::kFloat));
    }
    const ExpertWeights& e = lw.experts[dense ? 0 : 1];
    out.ffn.push_back({e.gate_proj.detach(), e.up_proj.detach(), e.down_proj.detach()});
  }
  if (!changed.empty()) {
    std::string list;
    for (size_t i = 0; i < changed.size() && i < 5; ++i) list += (i ? ", " : "") + changed[i];
    if (changed.size() > 5) list += absl::StrCat(" and ", changed.size() - 5, " more");
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to export: ", changed.size(), " tensor(s) that must stay frozen differ from the anchor (", list,
        "); train again from the anchor — an expert built on changed shared weights would not merge"));
  }
  return out;
}

absl::StatusOr<ExpertTensors> ReadExpertModule(const SafetensorsFile& file, int64_t num_layers) {
  ExpertTensors t;
  const bool with_bias = file.Contains(Name(0, "router.bias"));
  for (int64_t l = 0; l < num_layers; ++l) {
    absl::StatusOr<at::Tensor> gate = file.Get(Name(l, "gate_proj.weight")), up = file.Get(Name(l, "up_proj.weight")),
                               down = file.Get(Name(l, "down_proj.weight")), row = file.Get(Name(l, "router.weight"));
    for (auto* s : {&gate, &up, &down, &row}) {
      if (!s->ok()) return s->status();
    }
    t.ffn.push_back({*gate, *up, *down});
    t.router_rows.push_back(*row);
    if (with_bias) {
      absl::StatusOr<at::Tensor> bias = file.Get(Name(l, "router.bias"));
      if (!bias.ok()) return bias.status();
      t.router_bias.push_back(*bias);
    }
  }
  return t;
}

}  // namespace flexfed
