// flexfed-owner's commands that talk to the coordinator: enroll, pull, push, status.
// Everything goes over mTLS to the coordinator whose CA the owner pinned at enrollment.
#include <filesystem>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/model/anchor.h"
#include "common/client/coordinator_client.h"
#include "common/core/expert_module.h"
#include "common/core/file_util.h"
#include "common/core/identity.h"
#include "owner_client/commands.h"
#include <nlohmann/json.hpp>

namespace flexfed::owner {
namespace {

namespace fs = std::filesystem;

struct Connection {
  std::string coordinator = std::getenv("FLEXFED_COORDINATOR") ? std::getenv("FLEXFED_COORDINATOR") : "";
  std::string identity = std::getenv("FLEXFED_IDENTITY") ? std::getenv("FLEXFED_IDENTITY") : "";
  void AddOptions(CLI::App* cmd) {
    cmd->add_option("--coordinator", coordinator, "host:port of the coordinator ($FLEXFED_COORDINATOR)")->required(coordinator.empty());
    cmd->add_option("--identity", identity, "Your identity folder from `enroll` ($FLEXFED_IDENTITY)")->required(identity.empty());
  }
  absl::StatusOr<std::unique_ptr<CoordinatorClient>> Connect() const {
    absl::StatusOr<ClientIdentity> id = ClientIdentity::Load(identity);
    if (!id.ok()) return id.status();
    if (id->cert_pem.empty()) return absl::FailedPreconditionError(absl::StrCat(identity, ": not enrolled yet; run `flexfed-owner enroll`"));
    return CoordinatorClient::Connect(coordinator, *id);
  }
};

template <typename Call>
absl::Status Unary(CoordinatorClient& client, Call call) {
  std::unique_ptr<grpc::ClientContext> ctx = client.NewContext();
  absl::Status s = ToStatus(call(ctx.get()));
  if (absl::IsUnavailable(s)) return absl::UnavailableError(absl::StrCat(s.message(), " (is the coordinator running and reachable?)"));
  return s;
}

void AddEnroll(CLI::App& app) {
  struct O {
    Connection c;
    std::string owner, token, ca_cert, fingerprint;
  };
  auto o = std::make_shared<O>();
  CLI::App* cmd = app.add_subcommand("enroll", "Get your certificate: the key is made here and never leaves");
  cmd->add_option("--owner", o->owner, "Your owner id (from the operator)")->required();
  cmd->add_option("--token", o->token, "One-time enrollment token (from the operator)")->required();
  cmd->add_option("--ca-cert", o->ca_cert, "The project's ca.crt (from the operator)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--ca-fingerprint", o->fingerprint, "SHA-256 fingerprint of ca.crt, received over a separate channel")->required();
  cmd->add_option("--coordinator", o->c.coordinator, "host:port of the coordinator")->required(o->c.coordinator.empty());
  cmd->add_option("--identity", o->c.identity, "Folder to keep your key and certificate in")->required(o->c.identity.empty());
  cmd->callback([o] {
    ExitOnError("enroll", [&]() -> absl::Status {
      absl::StatusOr<std::string> ca = ReadFile(o->ca_cert);
      if (!ca.ok()) return ca.status();
      absl::StatusOr<std::string> fp = CertificateFingerprint(*ca);
      if (!fp.ok()) return fp.status();
      std::string want = o->fingerprint;
      want.erase(std::remove(want.begin(), want.end(), ':'), want.end());
      std::transform(want.begin(), want.end(), want.begin(), ::tolower);
      if (*fp != want) {
        return absl::PermissionDeniedError(absl::StrCat(o->ca_cert, " has fingerprint ", *fp, ", not the one you were given; do not enroll, ask the operator"));
      }
      if (fs::exists(fs::path(o->c.identity) / "client.key")) {
        return absl::AlreadyExistsError(absl::StrCat(o->c.identity, " already holds an identity; use another folder"));
      }
      absl::StatusOr<KeyAndCsr> key = MakeKeyAndCsr(o->owner);
      if (!key.ok()) return key.status();
      absl::StatusOr<std::unique_ptr<CoordinatorClient>> client = CoordinatorClient::Connect(o->c.coordinator, {*ca, "", ""});
      if (!client.ok()) return client.status();
      v1::EnrollRequest req;
      req.set_owner_id(o->owner);
      req.set_token(o->token);
      req.set_csr_pem(key->csr_pem);
      v1::EnrollResponse resp;
      if (absl::Status s = Unary(**client, [&](grpc::ClientContext* ctx) { return (*client)->enrollment().Enroll(ctx, req, &resp); }); !s.ok()) return s;
      if (absl::Status s = ClientIdentity{*ca, resp.certificate_pem(), key->key_pem}.Save(o->c.identity); !s.ok()) return s;
      std::cout << "enrolled as " << o->owner << "; identity in " << o->c.identity << " (the private key never left this machine)\n";
      return absl::OkStatus();
    }());
  });
}

void AddPull(CLI::App& app) {
  struct O {
    Connection c;
    std::string to;
  };
  auto o = std::make_shared<O>();
  CLI::App* cmd = app.add_subcommand("pull", "Download the current anchor, resumably, and verify it");
  cmd->add_option("--to", o->to, "Anchor directory to fill")->required();
  o->c.AddOptions(cmd);
  cmd->callback([o] {
    ExitOnError("pull", [&]() -> absl::Status {
      absl::StatusOr<std::unique_ptr<CoordinatorClient>> client = o->c.Connect();
      if (!client.ok()) return client.status();
      v1::Anchor anchor;
      if (absl::Status s = Unary(**client, [&](grpc::ClientContext* ctx) { return (*client)->owner().GetAnchor(ctx, v1::GetAnchorRequest(), &anchor); }); !s.ok()) return s;
      ProgressReporter progress;
      if (absl::Status s = (*client)->DownloadAnchorFiles(anchor, o->to, &progress); !s.ok()) return s;
      absl::StatusOr<std::string> id = AnchorId(o->to);
      if (!id.ok()) return id.status();
      if (*id != anchor.anchor_id()) {
        return absl::DataLossError(absl::StrCat(o->to, " does not add up to anchor ", anchor.anchor_id(), " (stray or changed files?); pull into an empty folder"));
      }
      std::cout << "anchor " << anchor.anchor_id() << " in " << o->to << " (verified)\n";
      return absl::OkStatus();
    }());
  });
}

void AddPush(CLI::App& app) {
  struct O {
    Connection c;
    std::string module, expert, anchor;
    double max_extraction = -1;
  };
  auto o = std::make_shared<O>();
  CLI::App* cmd = app.add_subcommand("push", "Upload your expert module, resumably; nothing else can be sent");
  cmd->add_option("module", o->module, "Expert module from `export`")->required()->check(CLI::ExistingFile);
  cmd->add_option("--expert", o->expert, "Expert id as registered (owner/name)")->required();
  cmd->add_option("--anchor", o->anchor, "Your copy of the anchor (checks the module against its allow-list first)")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--max-extraction", o->max_extraction,
                  "Upload only when the module records a complete extraction audit with at most this rate (e.g. 0.01)")
      ->check(CLI::Range(0.0, 1.0));
  o->c.AddOptions(cmd);
  cmd->callback([o] {
    ExitOnError("push", [&]() -> absl::Status {
      // The owner's own policy: only a valid expert module for this anchor ever leaves.
      absl::StatusOr<Anchor> anchor = LoadAnchor(o->anchor);
      if (!anchor.ok()) return anchor.status();
      absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(o->module);
      if (!file.ok()) return file.status();
      absl::StatusOr<Dtype> dtype = FromScalarType(anchor->model.dtype());
      absl::StatusOr<ExpertModuleMetadata> meta = ValidateExpertModule(o->module, anchor->model.config(), *dtype, anchor->id);
      if (!meta.ok()) return absl::FailedPreconditionError(absl::StrCat("refusing to upload: ", meta.status().message()));
      if (o->max_extraction >= 0) {
        PrivacyPolicy own;
        own.max_extraction = o->max_extraction;
        if (absl::Status s = CheckPrivacyPolicy(*meta, own); !s.ok()) {
          return absl::FailedPreconditionError(absl::StrCat("refusing to upload (--max-extraction): ", s.message()));
        }
      }
      absl::StatusOr<std::unique_ptr<CoordinatorClient>> client = o->c.Connect();
      if (!client.ok()) return client.status();
      ProgressReporter progress;
      absl::StatusOr<v1::CommitUploadResponse> r = (*client)->UploadFile(o->module, o->expert, &progress);
      if (!r.ok()) return r.status();
      if (!r->rejection().empty()) {
        return absl::InvalidArgumentError(absl::StrCat("the coordinator rejected the module (", r->rejection(), "): ", r->message()));
      }
      std::cout << "uploaded " << o->module << " as " << o->expert << " (" << r->blob().sha256().substr(0, 12) << "…); it awaits the operator\n";
      return absl::OkStatus();
    }());
  });
}

void AddStatus(CLI::App& app) {
  struct O {
    Connection c;
    std::string expert;
    bool json = false;
  };
  auto o = std::make_shared<O>();
  CLI::App* cmd = app.add_subcommand("status", "Your expert's state at the coordinator");
  cmd->add_option("--expert", o->expert, "Expert id (owner/name)")->required();
  cmd->add_flag("--json", o->json, "Print JSON");
  o->c.AddOptions(cmd);
  cmd->callback([o] {
    ExitOnError("status", [&]() -> absl::Status {
      absl::StatusOr<std::unique_ptr<CoordinatorClient>> client = o->c.Connect();
      if (!client.ok()) return client.status();
      v1::GetExpertRequest req;
      req.set_expert_id(o->expert);
      v1::Expert e;
      if (absl::Status s = Unary(**client, [&](grpc::ClientContext* ctx) { return (*client)->owner().GetExpert(ctx, req, &e); }); !s.ok()) return s;
      nlohmann::json j = {{"expert_id", e.expert_id()}, {"state", v1::ExpertState_Name(e.state())}, {"module_sha256", e.module().sha256()},
                          {"tokens_trained", e.tokens_trained()}, {"anchor_id", e.anchor_id()}};
      std::cout << (o->json ? j.dump() : j.dump(2)) << "\n";
      return absl::OkStatus();
    }());
  });
}

}  // namespace

void AddNetworkCommands(CLI::App& app) {
  AddEnroll(app);
  AddPull(app);
  AddPush(app);
  AddStatus(app);
}

}  // namespace flexfed::owner
