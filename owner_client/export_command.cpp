#include <filesystem>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/core/anchor_manifest.h"
#include "common/model/anchor.h"
#include "common/train/extraction_audit.h"
#include "common/merge/expert_export.h"
#include "common/core/file_util.h"
#include "common/train/training.h"
#include "owner_client/commands.h"
#include <nlohmann/json.hpp>

namespace flexfed::owner {
namespace {

namespace fs = std::filesystem;

struct Options {
  std::string run, model, anchor, out, router_init, audit;
  ExpertModuleMetadata meta;
};

// The extraction audit of exactly this model (`flexfed-owner audit`), as the module's privacy
// record: its summary only, never text. `audit_dir` empty: RUN/audit when there is one.
absl::StatusOr<std::string> PrivacyRecord(const Options& o, const std::string& model_dir) {
  std::string dir = o.audit;
  if (dir.empty()) {
    if (o.run.empty() || !fs::exists(fs::path(o.run) / "audit" / kExtractionReportFile)) return std::string();
    dir = (fs::path(o.run) / "audit").string();
  }
  const std::string path = (fs::path(dir) / kExtractionReportFile).string();
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return absl::NotFoundError(absl::StrCat("no audit result ", path, "; run `flexfed-owner audit` first"));
  nlohmann::json report = nlohmann::json::parse(*text, nullptr, false);
  if (report.is_discarded() || !report.is_object()) return absl::DataLossError(absl::StrCat(path, ": not valid JSON; audit again"));
  absl::StatusOr<std::string> model_id = AnchorId(model_dir);
  if (!model_id.ok()) return model_id.status();
  if (report.value("model", "") != *model_id) {
    return absl::FailedPreconditionError(absl::StrCat(path, " audits another model than ", model_dir,
                                                      " (trained further since?); audit again, or delete ", dir));
  }
  if (!report.value("complete", false)) {
    return absl::FailedPreconditionError(absl::StrCat(path, ": the audit was interrupted; finish it (run the same audit command again)"));
  }
  report.erase("model");
  report.erase("corpus");
  return nlohmann::json({{"extraction", report}}).dump();
}

absl::Status Run(Options o) {
  if (o.model.empty() && o.run.empty()) return absl::InvalidArgumentError("give --run RUN (or --model DIR)");
  const std::string model_dir = o.model.empty() ? (fs::path(o.run) / "model").string() : o.model;
  absl::StatusOr<Anchor> anchor = LoadAnchor(o.anchor);
  if (!anchor.ok()) return anchor.status();
  absl::StatusOr<FlexOlmoModel> trained = FlexOlmoModel::Load(model_dir);
  if (!trained.ok()) return trained.status();
  nlohmann::json dp_record;
  if (!o.run.empty()) {
    // What the run itself recorded: its anchor and how many tokens it trained on.
    absl::StatusOr<std::string> ckpt = LatestCheckpoint(o.run);
    if (!ckpt.ok()) return ckpt.status();
    absl::StatusOr<std::string> text = ReadFile((fs::path(*ckpt) / "state.json").string());
    if (!text.ok()) return text.status();
    nlohmann::json state = nlohmann::json::parse(*text, nullptr, false);
    if (state.is_discarded()) return absl::DataLossError(absl::StrCat(*ckpt, "/state.json: not valid JSON"));
    if (state.value("anchor_sha256", "") != anchor->id) {
      return absl::FailedPreconditionError(absl::StrCat(o.run, " was trained against another anchor than ", o.anchor,
                                                        "; pass the anchor it was trained against"));
    }
    if (o.meta.tokens_trained == 0) o.meta.tokens_trained = state.value("tokens", int64_t{0});
    if (state.contains("dp") && state["dp"].is_object()) dp_record = state["dp"];  // DP-SGD's settings and ε
    absl::StatusOr<std::string> cfg = ReadFile((fs::path(o.run) / "train_config.json").string());
    if (cfg.ok()) {
      nlohmann::json j = nlohmann::json::parse(*cfg, nullptr, false);
      if (!j.is_discarded() && o.router_init.empty() && j["settings"].value("mode", "") == "dense") {
        o.router_init = j.value("router_init", "");
      }
    }
  }
  std::optional<RouterEmbedding> dense_row;
  if (!trained->config().is_moe()) {
    if (o.router_init.empty()) {
      return absl::InvalidArgumentError("a dense model has no router row: pass --router-init FILE (from `router-init`)");
    }
    absl::StatusOr<RouterEmbedding> r = ReadRouterEmbedding(o.router_init, trained->config().num_hidden_layers,
                                                            trained->config().hidden_size);
    if (!r.ok()) return r.status();
    dense_row = *std::move(r);
    o.meta.router_init = dense_row->metadata.count("mode") ? dense_row->metadata.at("mode") : "vectors";
  }
  absl::StatusOr<ExpertTensors> expert =
      ExtractExpert(*trained, anchor->model, anchor->router_pub, dense_row ? &*dense_row : nullptr);
  if (!expert.ok()) return expert.status();
  absl::StatusOr<std::string> privacy = PrivacyRecord(o, model_dir);
  if (!privacy.ok()) return privacy.status();
  if (!dp_record.is_null()) {
    nlohmann::json record = privacy->empty() ? nlohmann::json::object() : nlohmann::json::parse(*privacy);
    record["dp"] = dp_record;
    *privacy = record.dump();
  }
  o.meta.privacy = *privacy;
  o.meta.anchor_sha256 = anchor->id;
  o.meta.config_hash = ConfigHash(anchor->model.config());
  if (o.meta.router_init.empty()) o.meta.router_init = "anchor";
  if (absl::Status s = WriteExpertModule(o.out, *expert, o.meta); !s.ok()) return s;
  // Check what was written exactly as the coordinator will.
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(o.out);
  if (!file.ok()) return file.status();
  absl::StatusOr<Dtype> dtype = FromScalarType(anchor->model.dtype());
  absl::StatusOr<ExpertModuleMetadata> valid = ValidateExpertModule(o.out, anchor->model.config(), *dtype, anchor->id);
  if (!valid.ok()) {
    fs::remove(o.out);
    return valid.status();
  }
  std::cout << "wrote expert module " << o.out << " (" << (*file)->Names().size() << " tensors, "
            << fs::file_size(o.out) << " bytes)" << (ExtractionRate(*valid) ? absl::StrCat(", extraction rate ", *ExtractionRate(*valid), " recorded") : "")
            << "; see exactly what it holds with: flexfed-owner inspect " << o.out << "\n";
  return absl::OkStatus();
}

}  // namespace

void AddExportCommand(CLI::App& app) {
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("export", "Write the expert module, the only thing that leaves your premises");
  cmd->footer("Refuses when any tensor that must stay frozen differs from the anchor.");
  auto* run = cmd->add_option("--run", o->run, "Training run folder (uses RUN/model)")->check(CLI::ExistingDirectory);
  cmd->add_option("--model", o->model, "A trained model directory instead of --run")->check(CLI::ExistingDirectory)->excludes(run);
  cmd->add_option("--anchor", o->anchor, "The anchor it was trained against")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--out,-o", o->out, "Output expert module (.safetensors)")->required();
  cmd->add_option("--owner", o->meta.owner, "Your owner id (as enrolled)")->required();
  cmd->add_option("--name", o->meta.expert_name, "Expert name (as registered)")->required();
  cmd->add_option("--domain", o->meta.domain, "Short description of the data domain");
  cmd->add_option("--tokens-trained", o->meta.tokens_trained, "Tokens trained (default: from the run)");
  cmd->add_option("--router-init", o->router_init, "Router embedding for a dense (--dense) model")->check(CLI::ExistingFile);
  cmd->add_option("--audit", o->audit, "The `audit` folder of this model, whose extraction rate goes into the metadata (default: RUN/audit when present)")
      ->check(CLI::ExistingDirectory);
  cmd->callback([o] { ExitOnError("export", Run(*o)); });
}

}  // namespace flexfed::owner
