#include "common/merge/merge.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/merge/expert_export.h"
#include "common/merge/router_tuning.h"
#include "common/core/file_util.h"
#include "common/core/identity.h"
#include "common/core/sha256.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace fs = std::filesystem;

const std::vector<std::string>& TokenizerFileNames() {
  static const std::vector<std::string> names = {"flexfed_tokenizer.json", "tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json", "vocab.json", "merges.txt",
                                                 "generation_config.json"};
  return names;
}

absl::StatusOr<std::vector<LoadedExpert>> LoadExperts(const Anchor& anchor, const std::vector<std::string>& paths,
                                                      const std::vector<std::string>& expected_sha256) {
  if (paths.empty()) return absl::InvalidArgumentError("merge: no expert modules given; a merge needs at least one");
  if (!expected_sha256.empty() && expected_sha256.size() != paths.size()) {
    return absl::InvalidArgumentError("merge: internal: one expected hash per module");
  }
  const ModelConfig& config = anchor.model.config();
  absl::StatusOr<Dtype> ffn_dtype = FromScalarType(anchor.model.dtype());
  if (!ffn_dtype.ok()) return ffn_dtype.status();
  std::vector<LoadedExpert> out;
  for (size_t i = 0; i < paths.size(); ++i) {
    LoadedExpert m;
    m.info.path = paths[i];
    absl::StatusOr<std::string> sha = Sha256File(paths[i]);
    if (!sha.ok()) return sha.status();
    m.info.sha256 = *sha;
    if (!expected_sha256.empty() && expected_sha256[i] != *sha) {
      return absl::InvalidArgumentError(absl::StrCat(paths[i], ": SHA-256 is ", *sha, " but the release records ",
                                                     expected_sha256[i], "; fetch the module again"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (out[j].info.sha256 == *sha) {
        return absl::InvalidArgumentError(absl::StrCat(paths[i], ": the same module as ", paths[j],
                                                       "; list each expert once"));
      }
    }
    absl::StatusOr<ExpertModuleMetadata> meta = ValidateExpertModule(paths[i], config, *ffn_dtype, anchor.id);
    if (!meta.ok()) return meta.status();
    m.info.metadata = *meta;
    absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(paths[i]);
    if (!file.ok()) return file.status();
    absl::StatusOr<ExpertTensors> t = ReadExpertModule(**file, config.num_hidden_layers);
    if (!t.ok()) return t.status();
    m.tensors = *std::move(t);
    out.push_back(std::move(m));
  }
  return out;
}

absl::StatusOr<MergedModel> MergeExperts(const Anchor& anchor, const std::vector<std::string>& module_paths,
                                         const MergeOptions& options, const std::vector<std::string>& expected_sha256) {
  absl::StatusOr<std::vector<LoadedExpert>> experts = LoadExperts(anchor, module_paths, expected_sha256);
  if (!experts.ok()) return experts.status();
  return MergeExperts(anchor, *experts, options);
}

absl::StatusOr<MergedModel> MergeExperts(const Anchor& anchor, const std::vector<LoadedExpert>& experts,
                                         const MergeOptions& options) {
  const FlexOlmoModel& a = anchor.model;
  if (a.config().num_experts != 1) {
    return absl::InvalidArgumentError(absl::StrCat(anchor.dir, ": the anchor has ", a.config().num_experts,
                                                   " experts; merging starts from a dense (one-expert) anchor"));
  }
  if (experts.empty()) return absl::InvalidArgumentError("merge: no expert modules given; a merge needs at least one");

  const int64_t num_experts = static_cast<int64_t>(experts.size()) + 1;
  const int64_t top_k = options.top_k == 0 ? num_experts : options.top_k;
  if (top_k < 1 || top_k > num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("merge: --k ", options.top_k, " is outside 1..", num_experts,
                                                   " (the merged model has ", num_experts, " experts)"));
  }
  bool any_bias = false;
  for (const LoadedExpert& m : experts) any_bias = any_bias || !m.tensors.router_bias.empty();
  const bool with_bias = options.with_router_bias && any_bias;

  ModelConfig config = a.config();
  config.model_type = "flex_olmo";
  config.num_experts = num_experts;
  config.num_experts_per_tok = top_k;
  config.norm_topk_prob = false;

  std::vector<LayerWeights> layers = a.layers();  // shares the anchor's tensors
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    LayerWeights& lw = layers[l];
    std::vector<at::Tensor> rows = {anchor.router_pub.rows[l].to(at::kFloat)};
    std::vector<at::Tensor> biases = {at::zeros({1}, at::kFloat)};  // the public expert takes no bias
    for (const LoadedExpert& m : experts) {
      lw.experts.push_back(m.tensors.ffn[l]);
      rows.push_back(m.tensors.router_rows[l]);
      biases.push_back(m.tensors.router_bias.empty() ? at::zeros({1}, at::kFloat) : m.tensors.router_bias[l]);
    }
    lw.router = at::stack(rows).to(a.dtype());
    lw.router_bias = with_bias ? at::cat(biases) : at::Tensor();
  }
  absl::StatusOr<FlexOlmoModel> model =
      FlexOlmoModel::Assemble(config, a.embed_tokens(), std::move(layers), a.norm(), a.lm_head());
  if (!model.ok()) return model.status();
  MergedModel out{*std::move(model), anchor.id, {}};
  for (const LoadedExpert& m : experts) out.experts.push_back(m.info);
  if (!options.router_tuning.empty()) {
    absl::StatusOr<RouterTuning> tuning = ReadRouterTuning(options.router_tuning);
    if (!tuning.ok()) return tuning.status();
    std::vector<std::string> hashes;
    for (const MergedExpert& e : out.experts) hashes.push_back(e.sha256);
    if (absl::Status s = ApplyRouterTuning(*tuning, anchor.id, hashes, out.model); !s.ok()) return s;
  }
  return out;
}

absl::Status WriteModelDirectory(const FlexOlmoModel& model, const std::string& anchor_dir, const std::string& out_dir,
                                 uint64_t max_shard_bytes, const std::map<std::string, std::string>& extra_files) {
  std::error_code ec;
  if (fs::exists(out_dir, ec)) {
    return absl::AlreadyExistsError(absl::StrCat(out_dir, ": already exists; choose a new output directory"));
  }
  const fs::path final_dir = fs::absolute(out_dir);
  const fs::path tmp = final_dir.parent_path() / absl::StrCat(".", final_dir.filename().string(), ".partial-", RandomHex(4));
  absl::Status s = model.Save(tmp.string(), max_shard_bytes);
  for (const std::string& name : TokenizerFileNames()) {
    const fs::path src = fs::path(anchor_dir) / name;
    if (!s.ok() || !fs::exists(src, ec)) continue;
    absl::StatusOr<std::string> bytes = ReadFile(src.string());
    s = bytes.ok() ? WriteFileAtomically((tmp / name).string(), *bytes) : bytes.status();
  }
  for (const auto& [name, contents] : extra_files) {
    if (s.ok()) s = WriteFileAtomically((tmp / name).string(), contents);
  }
  if (s.ok()) {
    fs::rename(tmp, final_dir, ec);
    if (ec) s = absl::InternalError(absl::StrCat(out_dir, ": cannot move the model into place: ", ec.message()));
  }
  if (!s.ok()) fs::remove_all(tmp, ec);
  return s;
}

absl::StatusOr<MergedModel> MergeToCheckpoint(const std::string& anchor_dir, const std::vector<std::string>& module_paths,
                                              const MergeOptions& options, const std::string& out_dir,
                                              const std::vector<std::string>& expected_sha256) {
  if (fs::exists(out_dir)) {  // before the (long) merge; WriteModelDirectory checks again
    return absl::AlreadyExistsError(absl::StrCat(out_dir, ": already exists; choose a new output directory"));
  }
  absl::StatusOr<Anchor> anchor = LoadAnchor(anchor_dir);
  if (!anchor.ok()) return anchor.status();
  absl::StatusOr<MergedModel> merged = MergeExperts(*anchor, module_paths, options, expected_sha256);
  if (!merged.ok()) return merged.status();
  nlohmann::json experts = nlohmann::json::array();
  for (size_t i = 0; i < merged->experts.size(); ++i) {
    const MergedExpert& e = merged->experts[i];
    experts.push_back({{"index", i + 1},
                       {"sha256", e.sha256},
                       {"owner", e.metadata.owner},
                       {"name", e.metadata.expert_name},
                       {"domain", e.metadata.domain},
                       {"tokens_trained", e.metadata.tokens_trained}});
  }
  const nlohmann::json record = {{"anchor_id", merged->anchor_id},
                                 {"num_experts", merged->model.config().num_experts},
                                 {"top_k", merged->model.config().num_experts_per_tok},
                                 {"router_bias", merged->model.layers()[0].router_bias.defined()},
                                 {"experts", experts}};
  std::map<std::string, std::string> files = options.extra_files;
  files[kMergeRecordFileName] = record.dump(2) + "\n";
  if (absl::Status s = WriteModelDirectory(merged->model, anchor_dir, out_dir, options.max_shard_bytes, files); !s.ok()) {
    return s;
  }
  return merged;
}

absl::StatusOr<FlexOlmoModel> SoupModel(const Anchor& anchor, const std::vector<LoadedExpert>& experts) {
  if (experts.empty()) return absl::InvalidArgumentError("soup: no expert modules given");
  const FlexOlmoModel& a = anchor.model;
  ModelConfig config = a.config();
  std::vector<LayerWeights> layers = a.layers();
  const double n = static_cast<double>(experts.size());
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    ExpertWeights mean;
    for (const LoadedExpert& m : experts) {
      const ExpertWeights& e = m.tensors.ffn[l];
      auto add = [](at::Tensor& acc, const at::Tensor& t) { acc = acc.defined() ? acc + t.to(at::kFloat) : t.to(at::kFloat); };
      add(mean.gate_proj, e.gate_proj);
      add(mean.up_proj, e.up_proj);
      add(mean.down_proj, e.down_proj);
    }
    layers[l].experts = {{(mean.gate_proj / n).to(a.dtype()), (mean.up_proj / n).to(a.dtype()),
                          (mean.down_proj / n).to(a.dtype())}};
  }
  return FlexOlmoModel::Assemble(config, a.embed_tokens(), std::move(layers), a.norm(), a.lm_head());
}

}  // namespace flexfed
