// flexfedctl's operator commands: `ca init` (local) and the admin API of a running coordinator.
// docs/OPERATOR_GUIDE.md describes the workflow; docs/CLI.md the exit codes.
#include "ctl/admin_commands.h"

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/client/coordinator_client.h"
#include "common/core/file_util.h"
#include "common/core/identity.h"
#include "common/core/sha256.h"
#include "ctl/remote.h"
#include <nlohmann/json.hpp>

namespace flexfed::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string StateName(v1::ExpertState s) {
  switch (s) {
    case v1::EXPERT_STATE_REGISTERED: return "registered";
    case v1::EXPERT_STATE_UPLOADED: return "uploaded";
    case v1::EXPERT_STATE_ACTIVE: return "active";
    case v1::EXPERT_STATE_DISABLED: return "disabled";
    case v1::EXPERT_STATE_RETIRED: return "retired";
    default: return "?";
  }
}

json ExpertJson(const v1::Expert& e) {
  return {{"expert_id", e.expert_id()}, {"owner", e.owner_id()}, {"name", e.name()}, {"domain", e.domain()},
          {"anchor_id", e.anchor_id()}, {"state", StateName(e.state())}, {"module_sha256", e.module().sha256()},
          {"module_size", e.module().size()}, {"tokens_trained", e.tokens_trained()}, {"updated_unix", e.updated_unix()}};
}

void PrintExperts(const std::vector<v1::Expert>& experts, bool as_json) {
  if (as_json) {
    json out = json::array();
    for (const auto& e : experts) out.push_back(ExpertJson(e));
    std::cout << out.dump(2) << "\n";
    return;
  }
  std::cout << absl::StrFormat("%-28s %-11s %-14s %12s  %s\n", "EXPERT", "STATE", "MODULE", "TOKENS", "DOMAIN");
  for (const auto& e : experts) {
    std::cout << absl::StrFormat("%-28s %-11s %-14s %12d  %s\n", e.expert_id(), StateName(e.state()),
                                 e.module().sha256().empty() ? "-" : e.module().sha256().substr(0, 12), e.tokens_trained(), e.domain());
  }
}

void AddCaInit(CLI::App& ca) {
  struct O {
    std::string dir, name = "FlexFed project CA", admin = "admin";
    int days = 3650, admin_days = 365;
  };
  auto o = std::make_shared<O>();
  CLI::App* cmd = ca.add_subcommand("init", "Create the project CA and an admin identity (never overwrites an existing CA)");
  cmd->add_option("--dir", o->dir, "Folder for ca.key, ca.crt and admin/")->required();
  cmd->add_option("--name", o->name, "CA name");
  cmd->add_option("--admin", o->admin, "Admin identity name");
  cmd->add_option("--days", o->days, "CA validity");
  cmd->add_option("--admin-days", o->admin_days, "Admin certificate validity");
  cmd->callback([o] {
    const fs::path key = fs::path(o->dir) / "ca.key";
    if (fs::exists(key)) {
      Fail("ca init", absl::AlreadyExistsError(absl::StrCat(key.string(), " exists: the project CA is never re-minted (it would orphan every enrolled owner); use another --dir for a new project")));
    }
    absl::StatusOr<std::pair<std::string, IssuedCertificate>> ca = MakeCa(o->name, o->days);
    if (!ca.ok()) Fail("ca init", ca.status());
    std::error_code ec;
    fs::create_directories(o->dir, ec);
    if (absl::Status s = WriteFileAtomically(key.string(), ca->first); !s.ok()) Fail("ca init", s);
    fs::permissions(key, fs::perms::owner_read | fs::perms::owner_write, ec);
    if (absl::Status s = WriteFileAtomically((fs::path(o->dir) / "ca.crt").string(), ca->second.certificate_pem); !s.ok()) Fail("ca init", s);
    absl::StatusOr<KeyAndCsr> req = MakeKeyAndCsr(o->admin);
    if (!req.ok()) Fail("ca init", req.status());
    absl::StatusOr<IssuedCertificate> admin = SignCsr(ca->first, ca->second.certificate_pem, req->csr_pem, o->admin, "admin", o->admin_days);
    if (!admin.ok()) Fail("ca init", admin.status());
    ClientIdentity id{ca->second.certificate_pem, admin->certificate_pem, req->key_pem};
    if (absl::Status s = id.Save((fs::path(o->dir) / "admin").string()); !s.ok()) Fail("ca init", s);
    std::cout << "project CA: " << (fs::path(o->dir) / "ca.crt").string() << "\nCA fingerprint (owners pin it): "
              << ca->second.fingerprint_sha256 << "\nadmin identity: " << (fs::path(o->dir) / "admin").string() << "\n";
  });
}

}  // namespace

void AddAdminCommands(CLI::App& app) {
  CLI::App* ca = app.add_subcommand("ca", "The project certificate authority");
  ca->require_subcommand(1);
  AddCaInit(*ca);

  // owner add | list | revoke
  CLI::App* owner = app.add_subcommand("owner", "Data owners: add (with a one-time enrollment token), list, revoke");
  owner->require_subcommand(1);
  // `owner add` and `owner reenroll`: both issue a one-time enrollment token and print it once.
  struct TokenCommand {
    const char* name;
    const char* help;
    decltype(&v1::Admin::Stub::AddOwner) rpc;
    const char* printed;  // after "owner ID "
    const char* next;     // what to do with the token
  };
  for (const TokenCommand& t :
       {TokenCommand{"add", "Add an owner and print its one-time enrollment token", &v1::Admin::Stub::AddOwner, "added",
                     "Give it to the owner with ca.crt and its fingerprint over a separate channel."},
        TokenCommand{"reenroll", "Give a revoked owner a new one-time enrollment token (its old certificate stays refused)",
                     &v1::Admin::Stub::ReenrollOwner, "may enroll again",
                     "The owner runs `flexfed-owner enroll` with it, into a new identity folder."}}) {
    struct O { Remote r; std::string id, name; int64_t ttl = 7 * 86400; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = owner->add_subcommand(t.name, t.help);
    cmd->add_option("owner", o->id, "Owner id (a-z 0-9 - _ .)")->required();
    if (std::string(t.name) == "add") cmd->add_option("--name", o->name, "Display name");
    cmd->add_option("--token-ttl", o->ttl, "Token lifetime in seconds");
    o->r.AddOptions(cmd, true);
    cmd->callback([o, t] {
      const std::string what = std::string("owner ") + t.name;
      auto client = o->r.Connect(what);
      v1::AddOwnerRequest req;
      req.set_owner_id(o->id);
      req.set_display_name(o->name);
      req.set_token_ttl_seconds(o->ttl);
      auto resp = Call<v1::AddOwnerRequest, v1::AddOwnerResponse>(what, *client, t.rpc, req);
      if (o->r.json) {
        std::cout << json({{"owner", o->id}, {"token", resp.token()}, {"token_expires_unix", resp.token_expires_unix()}}).dump() << "\n";
      } else {
        std::cout << "owner " << o->id << " " << t.printed << ". One-time enrollment token (shown once, expires "
                  << When(resp.token_expires_unix()) << " UTC):\n" << resp.token() << "\n" << t.next << "\n";
      }
    });
  }
  {
    auto r = std::make_shared<Remote>();
    CLI::App* cmd = owner->add_subcommand("list", "List owners");
    r->AddOptions(cmd, true);
    cmd->callback([r] {
      auto client = r->Connect("owner list");
      auto resp = Call<v1::ListRequest, v1::ListOwnersResponse>("owner list", *client, &v1::Admin::Stub::ListOwners, v1::ListRequest());
      if (r->json) {
        json out = json::array();
        for (const auto& o : resp.owners()) {
          out.push_back({{"owner", o.owner_id()}, {"name", o.display_name()}, {"enrolled", o.enrolled()}, {"revoked", o.revoked()},
                         {"certificate_sha256", o.certificate_sha256()}, {"certificate_expires_unix", o.certificate_expires_unix()},
                         {"last_seen_unix", o.last_seen_unix()}});
        }
        std::cout << out.dump(2) << "\n";
        return;
      }
      std::cout << absl::StrFormat("%-20s %-9s %-8s %-17s %s\n", "OWNER", "ENROLLED", "REVOKED", "CERT EXPIRES", "LAST SEEN");
      for (const auto& o : resp.owners()) {
        std::cout << absl::StrFormat("%-20s %-9s %-8s %-17s %s\n", o.owner_id(), o.enrolled() ? "yes" : "no", o.revoked() ? "yes" : "no",
                                     When(o.certificate_expires_unix()), When(o.last_seen_unix()));
      }
    });
  }
  {
    struct O { Remote r; std::string id, reason; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = owner->add_subcommand("revoke", "Revoke an owner: every later call with its certificate is refused");
    cmd->add_option("owner", o->id, "Owner id")->required();
    cmd->add_option("--reason", o->reason, "Why (kept in the audit log)");
    o->r.AddOptions(cmd, false);
    cmd->callback([o] {
      auto client = o->r.Connect("owner revoke");
      v1::RevokeOwnerRequest req;
      req.set_owner_id(o->id);
      req.set_reason(o->reason);
      Call<v1::RevokeOwnerRequest, v1::OwnerInfo>("owner revoke", *client, &v1::Admin::Stub::RevokeOwner, req);
      std::cout << "owner " << o->id << " revoked\n";
    });
  }

  // expert register | list | show | enable | disable | retire
  CLI::App* expert = app.add_subcommand("expert", "Expert slots: register, list, show, enable, disable, retire");
  expert->require_subcommand(1);
  {
    struct O { Remote r; std::string owner, name, domain; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = expert->add_subcommand("register", "Register an expert slot for an owner, bound to the current anchor");
    cmd->add_option("--owner", o->owner, "Owner id")->required();
    cmd->add_option("--name", o->name, "Expert name")->required();
    cmd->add_option("--domain", o->domain, "What data it covers");
    o->r.AddOptions(cmd, true);
    cmd->callback([o] {
      auto client = o->r.Connect("expert register");
      v1::RegisterExpertRequest req;
      req.set_owner_id(o->owner);
      req.set_name(o->name);
      req.set_domain(o->domain);
      auto e = Call<v1::RegisterExpertRequest, v1::Expert>("expert register", *client, &v1::Admin::Stub::RegisterExpert, req);
      if (o->r.json) std::cout << ExpertJson(e).dump() << "\n";
      else std::cout << "expert " << e.expert_id() << " registered against anchor " << e.anchor_id().substr(0, 12) << "\n";
    });
  }
  {
    auto r = std::make_shared<Remote>();
    CLI::App* cmd = expert->add_subcommand("list", "List experts");
    r->AddOptions(cmd, true);
    cmd->callback([r] {
      auto client = r->Connect("expert list");
      auto resp = Call<v1::ListRequest, v1::ListExpertsResponse>("expert list", *client, &v1::Admin::Stub::ListExperts, v1::ListRequest());
      PrintExperts({resp.experts().begin(), resp.experts().end()}, r->json);
    });
  }
  {
    struct O { Remote r; std::string id; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = expert->add_subcommand("show", "Show one expert");
    cmd->add_option("expert", o->id, "Expert id (owner/name)")->required();
    o->r.AddOptions(cmd, true);
    cmd->callback([o] {
      auto client = o->r.Connect("expert show");
      auto resp = Call<v1::ListRequest, v1::ListExpertsResponse>("expert show", *client, &v1::Admin::Stub::ListExperts, v1::ListRequest());
      for (const auto& e : resp.experts()) {
        if (e.expert_id() == o->id) {
          std::cout << ExpertJson(e).dump(2) << "\n";
          return;
        }
      }
      Fail("expert show", absl::NotFoundError(absl::StrCat("no expert '", o->id, "'; see `flexfedctl expert list`")));
    });
  }
  for (auto [verb, state, help] : {std::tuple{"enable", v1::EXPERT_STATE_ACTIVE, "Include the expert in the next release"},
                                   {"disable", v1::EXPERT_STATE_DISABLED, "Leave the expert out of the next release"},
                                   {"retire", v1::EXPERT_STATE_RETIRED, "Retire the expert for good"}}) {
    struct O { Remote r; std::string id; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = expert->add_subcommand(verb, help);
    cmd->add_option("expert", o->id, "Expert id (owner/name)")->required();
    o->r.AddOptions(cmd, false);
    const std::string name = absl::StrCat("expert ", verb);
    cmd->callback([o, state, name] {
      auto client = o->r.Connect(name);
      v1::SetExpertStateRequest req;
      req.set_expert_id(o->id);
      req.set_state(state);
      auto e = Call<v1::SetExpertStateRequest, v1::Expert>(name, *client, &v1::Admin::Stub::SetExpertState, req);
      std::cout << "expert " << e.expert_id() << " is " << StateName(e.state()) << "\n";
    });
  }

  // anchor publish | list
  CLI::App* anchor = app.add_subcommand("anchor", "The public anchor model: publish, list, show");
  anchor->require_subcommand(1);
  {
    struct O { Remote r; std::string dir, note; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = anchor->add_subcommand("publish", "Upload an anchor directory (HF checkpoint + router_pub.safetensors) and make it current");
    cmd->add_option("dir", o->dir, "Anchor directory")->required()->check(CLI::ExistingDirectory);
    cmd->add_option("--note", o->note, "A note kept with the anchor");
    o->r.AddOptions(cmd, true);
    cmd->callback([o] {
      auto client = o->r.Connect("anchor publish");
      v1::PublishAnchorRequest req;
      req.set_note(o->note);
      ProgressReporter progress;
      std::vector<fs::path> files;
      for (const auto& entry : fs::recursive_directory_iterator(o->dir)) {
        if (entry.is_regular_file() && entry.path().filename().string()[0] != '.') files.push_back(entry.path());
      }
      std::sort(files.begin(), files.end());
      for (const fs::path& f : files) {
        progress.Line(absl::StrCat("uploading ", fs::relative(f, o->dir).string()));
        absl::StatusOr<v1::CommitUploadResponse> r = client->UploadFile(f.string(), "", &progress);
        if (!r.ok()) Fail("anchor publish", r.status());
        v1::AnchorFile* af = req.add_files();
        af->set_name(fs::relative(f, o->dir).string());
        *af->mutable_blob() = r->blob();
      }
      auto a = Call<v1::PublishAnchorRequest, v1::Anchor>("anchor publish", *client, &v1::Admin::Stub::PublishAnchor, req);
      if (o->r.json) std::cout << json({{"anchor_id", a.anchor_id()}, {"config_hash", a.config_hash()}, {"files", a.files_size()}}).dump() << "\n";
      else std::cout << "anchor " << a.anchor_id() << " published (" << a.files_size() << " files) and is current\n";
    });
  }
  {
    auto r = std::make_shared<Remote>();
    CLI::App* cmd = anchor->add_subcommand("list", "List anchors");
    r->AddOptions(cmd, true);
    cmd->callback([r] {
      auto client = r->Connect("anchor list");
      auto resp = Call<v1::ListRequest, v1::ListAnchorsResponse>("anchor list", *client, &v1::Admin::Stub::ListAnchors, v1::ListRequest());
      json out = json::array();
      for (const auto& a : resp.anchors()) {
        uint64_t bytes = 0;
        for (const auto& f : a.files()) bytes += f.blob().size();
        out.push_back({{"anchor_id", a.anchor_id()}, {"current", a.anchor_id() == resp.current_anchor_id()}, {"files", a.files_size()},
                       {"bytes", bytes}, {"published_unix", a.published_unix()}, {"note", a.note()}});
      }
      if (r->json) {
        std::cout << out.dump(2) << "\n";
        return;
      }
      for (const auto& a : out) {
        std::cout << (a["current"].get<bool>() ? "* " : "  ") << a["anchor_id"].get<std::string>() << "  " << a["files"] << " files, "
                  << a["bytes"] << " bytes, " << When(a["published_unix"].get<int64_t>()) << "  " << a["note"].get<std::string>() << "\n";
      }
    });
  }

  {
    struct O { Remote r; std::string id; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = anchor->add_subcommand("show", "Show an anchor's files and hashes (default: the current one)");
    cmd->add_option("anchor", o->id, "Anchor id (default: current)");
    o->r.AddOptions(cmd, true);
    cmd->callback([o] {
      auto client = o->r.Connect("anchor show");
      auto resp = Call<v1::ListRequest, v1::ListAnchorsResponse>("anchor show", *client, &v1::Admin::Stub::ListAnchors, v1::ListRequest());
      const std::string want = o->id.empty() ? resp.current_anchor_id() : o->id;
      for (const auto& a : resp.anchors()) {
        if (a.anchor_id() != want) continue;
        json files = json::array();
        for (const auto& f : a.files()) files.push_back({{"name", f.name()}, {"sha256", f.blob().sha256()}, {"size", f.blob().size()}});
        json j = {{"anchor_id", a.anchor_id()}, {"current", a.anchor_id() == resp.current_anchor_id()}, {"config_hash", a.config_hash()},
                  {"published_unix", a.published_unix()}, {"note", a.note()}, {"files", files}};
        std::cout << (o->r.json ? j.dump() : j.dump(2)) << "\n";
        return;
      }
      Fail("anchor show", absl::NotFoundError(want.empty() ? "no anchor has been published yet"
                                                           : absl::StrCat("no anchor '", want, "'; see `flexfedctl anchor list`")));
    });
  }

  // upload list, audit tail, status
  {
    CLI::App* upload = app.add_subcommand("upload", "Upload sessions");
    upload->require_subcommand(1);
    auto r = std::make_shared<Remote>();
    CLI::App* cmd = upload->add_subcommand("list", "List recent upload sessions");
    r->AddOptions(cmd, true);
    cmd->callback([r] {
      auto client = r->Connect("upload list");
      v1::ListRequest req;
      req.set_limit(100);
      auto resp = Call<v1::ListRequest, v1::ListUploadsResponse>("upload list", *client, &v1::Admin::Stub::ListUploads, req);
      json out = json::array();
      for (const auto& u : resp.uploads()) {
        out.push_back({{"session", u.session_id()}, {"expert", u.expert_id()}, {"owner", u.owner_id()}, {"sha256", u.blob().sha256()},
                       {"size", u.blob().size()}, {"received", u.received_bytes()}, {"state", u.state()}, {"rejection", u.rejection()}});
      }
      if (r->json) {
        std::cout << out.dump(2) << "\n";
        return;
      }
      for (const auto& u : resp.uploads()) {
        std::cout << absl::StrFormat("%-12s %-24s %-10s %12d/%-12d %s\n", u.session_id().substr(0, 12),
                                     u.expert_id().empty() ? "(blob)" : u.expert_id(), u.state(), u.received_bytes(), u.blob().size(), u.rejection());
      }
    });
  }
  {
    CLI::App* audit = app.add_subcommand("audit", "The audit log");
    audit->require_subcommand(1);
    struct O { Remote r; int n = 50; int64_t skip = 0; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = audit->add_subcommand("tail", "The last audit events (JSON lines), a page at a time");
    cmd->add_option("-n", o->n, "How many");
    cmd->add_option("--skip", o->skip, "Skip this many of the newest first (page back)")->check(CLI::NonNegativeNumber);
    o->r.AddOptions(cmd, false);
    cmd->callback([o] {
      auto client = o->r.Connect("audit tail");
      v1::TailAuditRequest req;
      req.set_limit(o->n);
      req.set_skip(o->skip);
      auto resp = Call<v1::TailAuditRequest, v1::TailAuditResponse>("audit tail", *client, &v1::Admin::Stub::TailAudit, req);
      for (const auto& line : resp.events()) std::cout << line << "\n";
      if (resp.more()) {
        std::cerr << "(older events: audit tail -n " << o->n << " --skip " << o->skip + resp.events_size() << ")\n";
      }
    });
  }
  {
    struct O { Remote r; bool check = false, no_repair = false, skip_hashes = false; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = app.add_subcommand("status", "The coordinator's state at a glance; --check: its store's invariants");
    o->r.AddOptions(cmd, true);
    cmd->add_flag("--check", o->check,
                  "Check the store: no upload folder without an open upload, no unreferenced blob, every module and anchor "
                  "file present and hashing to its name, experts agreeing with their uploads; repair what is safe "
                  "(exit 1 when problems remain)");
    cmd->add_flag("--no-repair", o->no_repair, "With --check: report only");
    cmd->add_flag("--skip-hashes", o->skip_hashes, "With --check: presence and sizes only, no reading of every blob");
    cmd->footer("Exit codes: 0 ok, 1 error or (with --check) problems left, 2 bad usage.");
    cmd->callback([o] {
      const Remote* r = &o->r;
      if (!o->check && (o->no_repair || o->skip_hashes)) {
        std::cerr << "flexfedctl status: error: --no-repair and --skip-hashes go with --check\n";
        std::exit(2);  // bad usage
      }
      if (o->check) {
        auto client = r->Connect("status --check");
        v1::CheckStoreRequest req;
        req.set_repair(!o->no_repair);
        req.set_skip_hashes(o->skip_hashes);
        v1::CheckStoreResponse resp;
        std::unique_ptr<grpc::ClientContext> ctx = client->NewContext();
        ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::hours(24));  // hashing a large store takes long
        absl::Status st = ToStatus(client->admin().CheckStore(ctx.get(), req, &resp));
        if (absl::IsUnimplemented(st)) {
          st = absl::UnimplementedError("this coordinator predates store checks (protocol 1.2); upgrade it, or run it once: it checks at start-up");
        }
        if (!st.ok()) Fail("status --check", st);
        if (r->json) {
          json findings = json::array();
          for (const v1::StoreFinding& f : resp.findings()) {
            findings.push_back({{"kind", f.kind()}, {"object", f.object()}, {"detail", f.detail()}, {"repaired", f.repaired()}});
          }
          std::cout << json({{"findings", findings}, {"blobs", resp.blobs()}, {"bytes_hashed", resp.bytes_hashed()},
                             {"sessions", resp.sessions()}, {"unrepaired", resp.unrepaired()}}).dump() << "\n";
        } else {
          for (const v1::StoreFinding& f : resp.findings()) {
            std::cout << (f.repaired() ? "repaired  " : "PROBLEM   ") << f.kind() << " " << f.object() << ": " << f.detail() << "\n";
          }
          std::cout << "store: " << resp.blobs() << " blob(s), " << resp.bytes_hashed() / 1e9 << " GB hashed, " << resp.sessions()
                    << " upload folder(s); " << resp.findings_size() - resp.unrepaired() << " repaired, " << resp.unrepaired()
                    << " problem(s) left\n";
        }
        if (resp.unrepaired() > 0) std::exit(1);
        return;
      }
      auto client = r->Connect("status");
      auto s = Call<v1::GetStatusRequest, v1::StatusResponse>("status", *client, &v1::Admin::Stub::GetStatus, v1::GetStatusRequest());
      json j = {{"version", s.version()}, {"protocol", s.protocol()}, {"current_anchor_id", s.current_anchor_id()},
                {"owners", s.owners()}, {"experts", s.experts()}, {"open_uploads", s.open_uploads()}, {"started_unix", s.started_unix()}};
      std::cout << (r->json ? j.dump() : j.dump(2)) << "\n";
    });
  }
}

}  // namespace flexfed::cli
