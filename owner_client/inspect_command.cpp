#include <iostream>

#include "absl/strings/str_format.h"
#include "common/model/anchor.h"
#include "common/core/expert_module.h"
#include "common/core/sha256.h"
#include "owner_client/commands.h"
#include <nlohmann/json.hpp>

namespace flexfed::owner {
namespace {

struct Options {
  std::string file, anchor;
  bool json = false;
};

absl::Status Run(const Options& o) {
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(o.file);
  if (!file.ok()) return file.status();
  // Against an anchor: the full allow-list check the coordinator runs.
  std::string verdict = "not checked against an anchor (pass --anchor DIR)";
  absl::Status check = absl::OkStatus();
  if (!o.anchor.empty()) {
    absl::StatusOr<Anchor> anchor = LoadAnchor(o.anchor);
    if (!anchor.ok()) return anchor.status();
    absl::StatusOr<Dtype> dtype = FromScalarType(anchor->model.dtype());
    check = ValidateExpertModule(o.file, anchor->model.config(), *dtype, anchor->id).status();
    verdict = check.ok() ? "valid expert module for this anchor: only allow-listed tensors"
                         : std::string(check.message());
  }
  nlohmann::json tensors = nlohmann::json::array();
  uint64_t total = 0;
  for (const TensorInfo& t : (*file)->layout().tensors) {
    tensors.push_back({{"name", t.name}, {"dtype", DtypeName(t.dtype)}, {"shape", t.shape},
                       {"bytes", t.end - t.begin}, {"sha256", Sha256Hex((*file)->Bytes(t))}});
    total += t.end - t.begin;
  }
  if (o.json) {
    std::cout << nlohmann::json({{"file", o.file}, {"metadata", (*file)->metadata()}, {"tensors", tensors},
                                 {"tensor_bytes", total}, {"valid", o.anchor.empty() ? nlohmann::json(nullptr) : nlohmann::json(check.ok())},
                                 {"verdict", verdict}})
                     .dump(2)
              << "\n";
  } else {
    std::cout << o.file << "\nmetadata:\n";
    for (const auto& [k, v] : (*file)->metadata()) std::cout << "  " << k << ": " << v << "\n";
    std::cout << absl::StrFormat("tensors (%d, %d bytes):\n", tensors.size(), total);
    for (const auto& t : tensors) {
      std::cout << absl::StrFormat("  %-32s %-5s %-14s %s\n", t["name"].get<std::string>(), t["dtype"].get<std::string>(),
                                   t["shape"].dump(), t["sha256"].get<std::string>());
    }
    std::cout << "verdict: " << verdict << "\n";
  }
  if (!check.ok()) std::exit(1);
  return absl::OkStatus();
}

}  // namespace

void AddInspectCommand(CLI::App& app) {
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("inspect", "Show every tensor (name, dtype, shape, SHA-256) and the metadata of an expert module");
  cmd->add_option("file", o->file, "Expert module (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--anchor", o->anchor, "Check it against this anchor's allow-list")->check(CLI::ExistingDirectory);
  cmd->add_flag("--json", o->json, "Print JSON");
  cmd->callback([o] { ExitOnError("inspect", Run(*o)); });
}

}  // namespace flexfed::owner
