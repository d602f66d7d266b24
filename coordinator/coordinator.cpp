#include "coordinator/coordinator.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <set>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/core/anchor_manifest.h"
#include "common/core/expert_module.h"
#include "common/core/model_config.h"
#include "common/core/release.h"
#include "common/core/sha256.h"
#include "coordinator/sqlite_store.h"
#include "flexfed/v1/version.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

int64_t SystemNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

absl::Status Denied(const std::string& why) { return absl::PermissionDeniedError(why); }

ChunkLayout FromProto(const v1::Manifest& m) {
  ChunkLayout l;
  l.sha256 = m.blob().sha256();
  l.size = m.blob().size();
  l.chunk_size = m.chunk_size();
  for (const v1::ChunkInfo& c : m.chunks()) l.chunk_sha256.push_back(c.sha256());
  return l;
}

v1::Manifest ToProto(const ChunkLayout& l) {
  v1::Manifest m;
  m.mutable_blob()->set_sha256(l.sha256);
  m.mutable_blob()->set_size(l.size);
  m.set_chunk_size(l.chunk_size);
  for (uint64_t i = 0; i < l.chunk_sha256.size(); ++i) {
    v1::ChunkInfo* c = m.add_chunks();
    c->set_index(i);
    c->set_sha256(l.chunk_sha256[i]);
    c->set_size(l.ChunkBytes(i));
  }
  return m;
}

std::string ManifestJson(const ChunkLayout& l) {
  return json({{"sha256", l.sha256}, {"size", l.size}, {"chunk_size", l.chunk_size}, {"chunks", l.chunk_sha256}}).dump();
}

absl::StatusOr<ChunkLayout> ManifestFromJson(const std::string& text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) return absl::DataLossError("stored upload manifest is not valid JSON");
  ChunkLayout l;
  l.sha256 = j.value("sha256", "");
  l.size = j.value("size", uint64_t{0});
  l.chunk_size = j.value("chunk_size", uint64_t{0});
  l.chunk_sha256 = j.value("chunks", std::vector<std::string>{});
  return l;
}

v1::ExpertState StateToProto(const std::string& s) {
  if (s == "registered") return v1::EXPERT_STATE_REGISTERED;
  if (s == "uploaded") return v1::EXPERT_STATE_UPLOADED;
  if (s == "active") return v1::EXPERT_STATE_ACTIVE;
  if (s == "disabled") return v1::EXPERT_STATE_DISABLED;
  if (s == "retired") return v1::EXPERT_STATE_RETIRED;
  return v1::EXPERT_STATE_UNSPECIFIED;
}

v1::OwnerInfo OwnerToProto(const OwnerRecord& o) {
  v1::OwnerInfo p;
  p.set_owner_id(o.owner_id);
  p.set_display_name(o.display_name);
  p.set_enrolled(!o.certificate_sha256.empty());
  p.set_revoked(o.revoked);
  p.set_certificate_sha256(o.certificate_sha256);
  p.set_certificate_expires_unix(o.certificate_expires_unix);
  p.set_last_seen_unix(o.last_seen_unix);
  return p;
}

v1::Anchor AnchorToProto(const AnchorRecord& a) {
  v1::Anchor p;
  p.set_anchor_id(a.anchor_id);
  p.set_config_hash(a.config_hash);
  p.set_published_unix(a.published_unix);
  p.set_note(a.note);
  json files = json::parse(a.files_json, nullptr, false);
  if (files.is_array()) {
    for (const json& f : files) {
      v1::AnchorFile* af = p.add_files();
      af->set_name(f.value("name", ""));
      af->mutable_blob()->set_sha256(f.value("sha256", ""));
      af->mutable_blob()->set_size(f.value("size", uint64_t{0}));
    }
  }
  return p;
}

// Upper bound on an expert module's size for an anchor: its tensors plus a generous header.
uint64_t ModuleBound(const ModelConfig& c) {
  const uint64_t ffn = 3ull * static_cast<uint64_t>(c.hidden_size) * static_cast<uint64_t>(c.intermediate_size) *
                       (c.torch_dtype == "float32" ? 4 : 2);
  return static_cast<uint64_t>(c.num_hidden_layers) * (ffn + 4ull * c.hidden_size + 4) + (1u << 20);
}

}  // namespace

v1::Expert ToProto(const ExpertRecord& e) {
  v1::Expert p;
  p.set_expert_id(e.expert_id);
  p.set_owner_id(e.owner_id);
  p.set_name(e.name);
  p.set_domain(e.domain);
  p.set_anchor_id(e.anchor_id);
  p.set_state(StateToProto(e.state));
  if (!e.module_sha256.empty()) {
    p.mutable_module()->set_sha256(e.module_sha256);
    p.mutable_module()->set_size(static_cast<uint64_t>(e.module_size));
  }
  p.set_tokens_trained(e.tokens_trained);
  p.set_updated_unix(e.updated_unix);
  return p;
}

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Open(const CoordinatorOptions& options) {
  std::unique_ptr<Coordinator> c(new Coordinator());
  c->options_ = options;
  if (!c->options_.clock) c->options_.clock = SystemNow;
  c->started_unix_ = c->Now();
  std::error_code ec;
  fs::create_directories(options.data_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(options.data_dir, ": cannot create: ", ec.message()));
  absl::StatusOr<std::unique_ptr<SqliteStore>> store = SqliteStore::Open((fs::path(options.data_dir) / "metadata.db").string());
  if (!store.ok()) return store.status();
  c->store_ = *std::move(store);
  absl::StatusOr<std::unique_ptr<BlobStore>> blobs = BlobStore::Open((fs::path(options.data_dir) / "store").string());
  if (!blobs.ok()) return blobs.status();
  c->blobs_ = *std::move(blobs);
  absl::StatusOr<std::unique_ptr<AuditLog>> audit = AuditLog::Open((fs::path(options.data_dir) / "audit.jsonl").string());
  if (!audit.ok()) return audit.status();
  c->audit_ = *std::move(audit);
  // A crash can leave upload folders of finished sessions, blobs stored but never recorded, chunk
  // manifests without their blob: the check repairs those and reports the rest. Hashing every blob
  // is left to a check in the background (coordinator_main) or on demand.
  v1::CheckStoreRequest startup;
  startup.set_repair(true);
  startup.set_skip_hashes(true);
  absl::StatusOr<v1::CheckStoreResponse> check = c->CheckStore({"coordinator", "server", "", 0}, startup);
  if (!check.ok()) return check.status();
  c->startup_check_ = *std::move(check);
  return c;
}

absl::Status Coordinator::TryAudit(const PeerIdentity& who, const std::string& action, std::map<std::string, std::string> objects,
                                   const std::string& result) {
  absl::StatusOr<std::string> id = audit_->Append({who.id.empty() ? "-" : who.id, who.fingerprint_sha256, action,
                                                   std::move(objects), result});
  if (id.ok()) return absl::OkStatus();
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++counters_.audit_failures;
  }
  std::fprintf(stderr, "%s\n",
               json({{"level", "error"}, {"event", "audit_failed"}, {"action", action}, {"message", std::string(id.status().message())}})
                   .dump()
                   .c_str());
  return id.status();
}

std::shared_mutex& Coordinator::SessionLock(const std::string& session_id) {
  return session_locks_[std::hash<std::string>{}(session_id) % session_locks_.size()];
}

std::mutex& Coordinator::ExpertLock(const std::string& expert_id) {
  return expert_locks_[std::hash<std::string>{}(expert_id) % expert_locks_.size()];
}

CoordinatorCounters Coordinator::counters() {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

absl::StatusOr<PeerIdentity> Coordinator::Authenticate(const std::string& pem) {
  if (pem.empty()) return absl::UnauthenticatedError("no client certificate: enroll first (flexfed-owner enroll)");
  absl::StatusOr<PeerIdentity> id = ReadIdentity(pem);
  if (!id.ok()) return absl::UnauthenticatedError(std::string(id.status().message()));
  if (id->role == "admin") return id;
  if (id->role != "owner") return absl::UnauthenticatedError("a server certificate cannot be used as a client");
  absl::StatusOr<OwnerRecord> owner = store_->GetOwner(id->id);
  if (!owner.ok()) return absl::UnauthenticatedError(absl::StrCat("owner '", id->id, "' is not known here"));
  if (owner->revoked) return Denied(absl::StrCat("owner '", id->id, "' was revoked: ", owner->revoked_reason));
  if (owner->certificate_sha256 != id->fingerprint_sha256) {
    return Denied(absl::StrCat("this is not owner '", id->id, "''s current certificate; enroll again"));
  }
  return id;
}

absl::StatusOr<v1::EnrollResponse> Coordinator::Enroll(const v1::EnrollRequest& r) {
  // Unauthenticated input: validated before anything is audited or logged, so a caller cannot
  // flood the audit log with megabyte ids (a refusal records only the id's length).
  if (!IsValidName(r.owner_id())) {
    Audit({"-", "owner", "", 0}, "owner.enroll", {{"owner_id_bytes", std::to_string(r.owner_id().size())}},
          "refused: not a valid owner id");
    return Denied("enrollment refused: not a valid owner id (1-64 of a-z 0-9 - _ .)");
  }
  if (r.token().size() > 256 || r.csr_pem().size() > (64 << 10)) {
    Audit({r.owner_id(), "owner", "", 0}, "owner.enroll", {{"owner", r.owner_id()}}, "refused: oversized token or CSR");
    return Denied("enrollment refused: the token or the CSR is too large");
  }
  PeerIdentity who{r.owner_id(), "owner", "", 0};
  auto refuse = [&](const std::string& why) {
    Audit(who, "owner.enroll", {{"owner", r.owner_id()}}, why);
    return Denied(absl::StrCat("enrollment refused: ", why));
  };
  absl::StatusOr<OwnerRecord> owner = store_->GetOwner(r.owner_id());
  if (!owner.ok()) return refuse("unknown owner id");
  if (owner->revoked) return refuse("the owner is revoked");
  if (owner->token_sha256.empty()) return refuse("the token was already used; ask the operator for a new one");
  if (Sha256Hex(r.token()) != owner->token_sha256) return refuse("wrong token");
  if (Now() > owner->token_expires_unix) return refuse("the token has expired; ask the operator for a new one");
  absl::StatusOr<IssuedCertificate> cert =
      SignCsr(options_.ca_key_pem, options_.ca_cert_pem, r.csr_pem(), r.owner_id(), "owner", options_.certificate_days);
  if (!cert.ok()) return refuse(std::string(cert.status().message()));
  // One-time: consumed by a conditional update, so of concurrent enrollments with one token exactly
  // one gets its certificate recorded (the others' certificates are never valid: not recorded).
  if (absl::Status s = store_->ConsumeEnrollmentToken(r.owner_id(), owner->token_sha256, cert->fingerprint_sha256,
                                                      cert->not_after_unix);
      !s.ok()) {
    if (absl::IsFailedPrecondition(s)) return refuse(std::string(s.message()));
    return s;
  }
  who.fingerprint_sha256 = cert->fingerprint_sha256;
  Audit(who, "owner.enroll", {{"owner", r.owner_id()}, {"certificate", cert->fingerprint_sha256}}, "ok");
  v1::EnrollResponse out;
  out.set_certificate_pem(cert->certificate_pem);
  out.set_ca_certificate_pem(options_.ca_cert_pem);
  return out;
}

absl::StatusOr<v1::Anchor> Coordinator::PublishAnchor(const PeerIdentity& who, const v1::PublishAnchorRequest& r) {
  std::vector<AnchorFile> listed;
  for (const v1::AnchorFile& f : r.files()) listed.push_back({f.name(), f.blob().sha256(), f.blob().size()});
  if (absl::Status s = CheckAnchorFiles(listed); !s.ok()) return s;
  std::vector<std::pair<std::string, v1::BlobRef>> files;
  for (const v1::AnchorFile& f : r.files()) {
    absl::StatusOr<uint64_t> size = blobs_->Size(f.blob().sha256());
    if (!size.ok() || *size != f.blob().size()) {
      return absl::FailedPreconditionError(absl::StrCat("anchor file '", f.name(), "' has not been uploaded (blob ", f.blob().sha256(), ")"));
    }
    files.push_back({f.name(), f.blob()});
  }
  std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  auto find = [&](const std::string& name) -> const v1::BlobRef* {
    for (const auto& [n, b] : files) {
      if (n == name) return &b;
    }
    return nullptr;
  };
  for (const char* required : {"config.json", "router_pub.safetensors"}) {
    if (find(required) == nullptr) return absl::InvalidArgumentError(absl::StrCat("an anchor needs ", required));
  }
  absl::StatusOr<ModelConfig> config = ConfigFromBlob(*find("config.json"));
  if (!config.ok()) return config.status();
  if (config->num_experts != 1) return absl::InvalidArgumentError("an anchor is a dense model (olmo2, or flex_olmo with one expert)");
  // The same id as AnchorId() computes on the owner's copy of the directory.
  std::vector<AnchorFile> manifest;
  json files_json = json::array();
  for (const auto& [name, blob] : files) {
    manifest.push_back({name, blob.sha256(), blob.size()});
    files_json.push_back({{"name", name}, {"sha256", blob.sha256()}, {"size", blob.size()}});
  }
  AnchorRecord a{AnchorIdOf(std::move(manifest)), files_json.dump(), ConfigHash(*config), Now(), r.note(), true};
  absl::Status s = store_->AddAnchor(a, /*make_current=*/true);
  Audit(who, "anchor.publish", {{"anchor", a.anchor_id}}, s.ok() ? "ok" : std::string(s.message()));
  if (!s.ok()) return s;
  return AnchorToProto(a);
}

absl::StatusOr<v1::ListAnchorsResponse> Coordinator::ListAnchors() {
  absl::StatusOr<std::vector<AnchorRecord>> all = store_->ListAnchors();
  if (!all.ok()) return all.status();
  v1::ListAnchorsResponse out;
  for (const AnchorRecord& a : *all) {
    *out.add_anchors() = AnchorToProto(a);
    if (a.current) out.set_current_anchor_id(a.anchor_id);
  }
  return out;
}

absl::StatusOr<v1::Anchor> Coordinator::GetAnchor(const std::string& anchor_id) {
  absl::StatusOr<AnchorRecord> a = store_->GetAnchor(anchor_id);
  if (!a.ok()) return a.status();
  return AnchorToProto(*a);
}

absl::StatusOr<int64_t> Coordinator::TokenExpiry(int64_t requested_ttl_seconds) const {
  const int64_t ttl = requested_ttl_seconds > 0 ? requested_ttl_seconds : options_.default_token_ttl_seconds;
  // A one-time token is for an enrollment about to happen: a year at most, which also keeps
  // now + ttl far from int64's end whatever the caller asked.
  if (ttl <= 0 || ttl > kMaxTokenTtlSeconds) {
    return absl::InvalidArgumentError(absl::StrCat("a token lifetime of ", ttl, " s is out of range; give 1 to ", kMaxTokenTtlSeconds,
                                                   " s (366 days)"));
  }
  return Now() + ttl;
}

absl::StatusOr<v1::AddOwnerResponse> Coordinator::AddOwner(const PeerIdentity& who, const v1::AddOwnerRequest& r) {
  if (!IsValidName(r.owner_id())) {
    return absl::InvalidArgumentError(absl::StrCat("owner id '", r.owner_id(), "' is not valid: 1-64 of a-z 0-9 - _ ."));
  }
  absl::StatusOr<int64_t> expires = TokenExpiry(r.token_ttl_seconds());
  if (!expires.ok()) return expires.status();
  const std::string token = RandomHex(24);
  OwnerRecord o{r.owner_id(), r.display_name().empty() ? r.owner_id() : r.display_name(), Now(), Sha256Hex(token),
                *expires, "", 0, false, "", 0};
  absl::Status s = store_->AddOwner(o);
  Audit(who, "owner.add", {{"owner", o.owner_id}}, s.ok() ? "ok" : std::string(s.message()));
  if (absl::IsAlreadyExists(s)) return absl::AlreadyExistsError(absl::StrCat("owner '", o.owner_id, "' already exists"));
  if (!s.ok()) return s;
  v1::AddOwnerResponse out;
  *out.mutable_owner() = OwnerToProto(o);
  out.set_token(token);
  out.set_token_expires_unix(o.token_expires_unix);
  return out;
}

absl::StatusOr<v1::AddOwnerResponse> Coordinator::ReenrollOwner(const PeerIdentity& who, const v1::AddOwnerRequest& r) {
  if (!IsValidName(r.owner_id())) return absl::InvalidArgumentError("not a valid owner id");
  absl::StatusOr<int64_t> expiry = TokenExpiry(r.token_ttl_seconds());
  if (!expiry.ok()) return expiry.status();
  const int64_t expires = *expiry;
  const std::string token = RandomHex(24);
  absl::Status s = store_->ReissueEnrollmentToken(r.owner_id(), Sha256Hex(token), expires);
  Audit(who, "owner.reenroll", {{"owner", r.owner_id()}}, s.ok() ? "ok" : std::string(s.message()));
  if (!s.ok()) return s;
  absl::StatusOr<OwnerRecord> o = store_->GetOwner(r.owner_id());
  if (!o.ok()) return o.status();
  v1::AddOwnerResponse out;
  *out.mutable_owner() = OwnerToProto(*o);
  out.set_token(token);
  out.set_token_expires_unix(expires);
  return out;
}

absl::StatusOr<v1::ListOwnersResponse> Coordinator::ListOwners() {
  absl::StatusOr<std::vector<OwnerRecord>> all = store_->ListOwners();
  if (!all.ok()) return all.status();
  v1::ListOwnersResponse out;
  for (const OwnerRecord& o : *all) *out.add_owners() = OwnerToProto(o);
  return out;
}

absl::StatusOr<v1::OwnerInfo> Coordinator::RevokeOwner(const PeerIdentity& who, const v1::RevokeOwnerRequest& r) {
  if (!IsValidName(r.owner_id())) return absl::InvalidArgumentError("not a valid owner id");
  const std::string reason = r.reason().empty() ? "revoked by an operator" : r.reason().substr(0, 500);
  absl::Status s = store_->RevokeOwner(r.owner_id(), reason);  // only these fields: nothing else is lost
  absl::StatusOr<OwnerRecord> o = store_->GetOwner(r.owner_id());
  Audit(who, "owner.revoke", {{"owner", r.owner_id()}, {"certificate", o.ok() ? o->certificate_sha256 : ""}},
        s.ok() ? "ok" : std::string(s.message()));
  if (!s.ok()) return s;
  if (!o.ok()) return o.status();
  return OwnerToProto(*o);
}

absl::StatusOr<v1::Expert> Coordinator::RegisterExpert(const PeerIdentity& who, const v1::RegisterExpertRequest& r) {
  absl::StatusOr<OwnerRecord> owner = store_->GetOwner(r.owner_id());
  if (!owner.ok()) return absl::NotFoundError(absl::StrCat("no owner '", r.owner_id(), "'; add it with `flexfedctl owner add`"));
  if (owner->revoked) return absl::FailedPreconditionError(absl::StrCat("owner '", r.owner_id(), "' is revoked"));
  if (!IsValidName(r.name())) return absl::InvalidArgumentError(absl::StrCat("expert name '", r.name(), "' is not valid"));
  absl::StatusOr<AnchorRecord> anchor = store_->GetAnchor("");
  if (!anchor.ok()) return anchor.status();
  const int64_t now = Now();
  ExpertRecord e{absl::StrCat(r.owner_id(), "/", r.name()), r.owner_id(), r.name(), r.domain(), anchor->anchor_id,
                 "registered", "", 0, 0, now, now};
  absl::Status s = store_->AddExpert(e);
  Audit(who, "expert.register", {{"expert", e.expert_id}, {"anchor", e.anchor_id}}, s.ok() ? "ok" : std::string(s.message()));
  if (absl::IsAlreadyExists(s)) return absl::AlreadyExistsError(absl::StrCat("expert '", e.expert_id, "' already exists"));
  if (!s.ok()) return s;
  return ToProto(e);
}

absl::StatusOr<v1::ListExpertsResponse> Coordinator::ListExperts() {
  absl::StatusOr<std::vector<ExpertRecord>> all = store_->ListExperts();
  if (!all.ok()) return all.status();
  v1::ListExpertsResponse out;
  for (const ExpertRecord& e : *all) *out.add_experts() = ToProto(e);
  return out;
}

absl::StatusOr<v1::Expert> Coordinator::SetExpertState(const PeerIdentity& who, const v1::SetExpertStateRequest& r) {
  absl::StatusOr<ExpertRecord> e = store_->GetExpert(r.expert_id());
  if (!e.ok()) return e.status();
  std::string next;
  switch (r.state()) {
    case v1::EXPERT_STATE_ACTIVE: next = "active"; break;
    case v1::EXPERT_STATE_DISABLED: next = "disabled"; break;
    case v1::EXPERT_STATE_RETIRED: next = "retired"; break;
    default: return absl::InvalidArgumentError("an expert can be set active (enable), disabled or retired");
  }
  // Compare-and-set on the state alone (a commit racing this call changes only module fields), retried
  // when another state change came in between.
  absl::Status s;
  for (int attempt = 0; attempt < 5; ++attempt) {
    if (attempt > 0) {
      e = store_->GetExpert(r.expert_id());
      if (!e.ok()) return e.status();
    }
    if (e->state == "retired") return absl::FailedPreconditionError(absl::StrCat("expert '", e->expert_id, "' is retired for good"));
    // Only an expert with a module is enabled or disabled (registered -> uploaded -> active <-> disabled).
    if (next != "retired" && e->module_sha256.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("expert '", e->expert_id, "' has no uploaded module yet; it cannot be ",
                                                        next == "active" ? "enabled" : "disabled (it joins no release before it is enabled)"));
    }
    s = store_->SetExpertState(e->expert_id, e->state, next, Now());
    if (!absl::IsFailedPrecondition(s)) break;
  }
  e->state = next;
  e->updated_unix = Now();
  Audit(who, "expert." + next, {{"expert", e->expert_id}, {"module", e->module_sha256}}, s.ok() ? "ok" : std::string(s.message()));
  if (!s.ok()) return s;
  return ToProto(*e);
}

absl::StatusOr<v1::ListUploadsResponse> Coordinator::ListUploads(int limit) {
  absl::StatusOr<std::vector<UploadRecord>> all = store_->ListUploads(limit);
  if (!all.ok()) return all.status();
  v1::ListUploadsResponse out;
  for (const UploadRecord& u : *all) {
    v1::UploadInfo* i = out.add_uploads();
    i->set_session_id(u.session_id);
    i->set_expert_id(u.expert_id);
    i->set_owner_id(u.owner_id);
    i->mutable_blob()->set_sha256(u.blob_sha256);
    i->mutable_blob()->set_size(static_cast<uint64_t>(u.blob_size));
    absl::StatusOr<ChunkLayout> layout = ManifestFromJson(u.manifest_json);
    i->set_received_bytes(u.state == "open" && layout.ok() ? blobs_->ReceivedBytes(u.session_id, *layout)
                                                            : static_cast<uint64_t>(u.blob_size));
    i->set_state(u.state);
    i->set_rejection(u.rejection);
    i->set_started_unix(u.started_unix);
    i->set_updated_unix(u.updated_unix);
  }
  return out;
}

absl::StatusOr<v1::TailAuditResponse> Coordinator::TailAudit(int limit, int64_t skip) {
  bool more = false;
  absl::StatusOr<std::vector<std::string>> lines =
      audit_->Tail(limit > 0 ? std::min<size_t>(static_cast<size_t>(limit), 100000) : 50,
                   skip > 0 ? static_cast<size_t>(std::min<int64_t>(skip, 1'000'000'000)) : 0, &more);
  if (!lines.ok()) return lines.status();
  v1::TailAuditResponse out;
  for (const std::string& l : *lines) out.add_events(l);
  out.set_more(more);
  return out;
}

absl::StatusOr<v1::StatusResponse> Coordinator::Status() {
  v1::StatusResponse out;
  out.set_version("0.1.0");
  out.set_protocol(kProtocolVersion);
  absl::StatusOr<AnchorRecord> a = store_->GetAnchor("");
  if (a.ok()) out.set_current_anchor_id(a->anchor_id);
  absl::StatusOr<std::vector<OwnerRecord>> owners = store_->ListOwners();
  if (owners.ok()) out.set_owners(static_cast<int64_t>(owners->size()));
  absl::StatusOr<std::vector<ExpertRecord>> experts = store_->ListExperts();
  if (experts.ok()) out.set_experts(static_cast<int64_t>(experts->size()));
  absl::StatusOr<std::vector<UploadRecord>> uploads = store_->ListUploads(100000);
  if (uploads.ok()) out.set_open_uploads(std::count_if(uploads->begin(), uploads->end(), [](const UploadRecord& u) { return u.state == "open"; }));
  out.set_started_unix(started_unix_);
  return out;
}

absl::StatusOr<v1::CheckStoreResponse> Coordinator::CheckStore(const PeerIdentity& who, const v1::CheckStoreRequest& r) {
  std::lock_guard<std::mutex> check_lock(check_mu_);
  v1::CheckStoreResponse out;
  auto add = [&](const std::string& kind, const std::string& object, const std::string& detail, bool repaired) {
    v1::StoreFinding* f = out.add_findings();
    f->set_kind(kind);
    f->set_object(object);
    f->set_detail(detail);
    f->set_repaired(repaired);
    if (!repaired) out.set_unrepaired(out.unrepaired() + 1);
  };
  if (absl::Status s = store_->CheckIntegrity(); !s.ok()) {
    add("database", "metadata.db", absl::StrCat(s.message(), "; stop the coordinator and restore metadata.db from a backup"), false);
  }

  // 1. Upload folders: each belongs to an open upload, or nothing will ever read it. Checked under
  // the session's lock, so neither a chunk nor a commit is half-way through it.
  for (const std::string& name : blobs_->SessionFolders()) {
    out.set_sessions(out.sessions() + 1);
    if (!IsValidSessionId(name)) {
      const bool removed = r.repair() && blobs_->RemoveStray("uploads/" + name).ok();
      add("stray_session", name, "not an upload session's name", removed);
      continue;
    }
    std::unique_lock<std::shared_mutex> session_lock(SessionLock(name));
    // Listed before the lock was taken: a commit may have assembled and dropped it since.
    if (!blobs_->HasSessionFolder(name)) continue;
    absl::StatusOr<UploadRecord> u = store_->GetUpload(name);
    if (u.ok() && u->state == "open") continue;
    if (!u.ok() && !absl::IsNotFound(u.status())) return u.status();
    if (r.repair()) blobs_->DropSession(name);
    add("stray_session", name, u.ok() ? absl::StrCat("its upload is ", u->state, "; the folder is left from before") : "no upload has this id", r.repair());
  }

  // 2. What the records name: every expert's module, every anchor file, every release member.
  absl::StatusOr<std::vector<ExpertRecord>> experts = store_->ListExperts();
  if (!experts.ok()) return experts.status();
  absl::StatusOr<std::vector<AnchorRecord>> anchors = store_->ListAnchors();
  if (!anchors.ok()) return anchors.status();
  absl::StatusOr<std::vector<ReleaseRecord>> releases = store_->ListReleases();
  if (!releases.ok()) return releases.status();
  struct Named {
    int64_t size = -1;
    std::vector<std::string> by;
  };
  std::map<std::string, Named> named;
  auto name = [&](const std::string& sha, int64_t size, std::string by) {
    if (!IsValidSha256(sha)) {
      add("database", by, absl::StrCat("names a blob by '", sha.substr(0, 64), "', not a SHA-256; restore metadata.db from a backup"), false);
      return;
    }
    Named& n = named[sha];
    if (n.size >= 0 && n.size != size) add("database", sha, absl::StrCat(by, " gives it ", size, " bytes, ", n.by[0], " ", n.size), false);
    n.size = size;
    n.by.push_back(std::move(by));
  };
  for (const ExpertRecord& e : *experts) {
    if (!e.module_sha256.empty()) name(e.module_sha256, e.module_size, absl::StrCat("expert ", e.expert_id));
  }
  for (const AnchorRecord& a : *anchors) {
    json files = json::parse(a.files_json, nullptr, false);
    if (!files.is_array()) {
      add("database", a.anchor_id, "the anchor's file list is not a JSON list; restore metadata.db from a backup", false);
      continue;
    }
    for (const json& f : files) {
      if (!f.is_object()) continue;
      name(f.value("sha256", ""), f.value("size", int64_t{0}), absl::StrCat("anchor ", a.anchor_id.substr(0, 12), " file ", f.value("name", "")));
    }
  }
  for (const ReleaseRecord& rel : *releases) {
    absl::StatusOr<ReleaseManifest> m = ReleaseManifest::FromJson(rel.manifest_json, rel.release_id);
    if (!m.ok()) {
      add("database", rel.release_id, absl::StrCat(m.status().message(), "; restore metadata.db from a backup"), false);
      continue;
    }
    for (const ReleaseExpert& x : m->experts) name(x.module_sha256, x.module_size, absl::StrCat("release ", rel.release_id, " (", x.expert_id, ")"));
  }
  auto who_names = [&](const std::string& sha) {
    const std::vector<std::string>& by = named[sha].by;
    return absl::StrCat(by[0], by.size() > 1 ? absl::StrCat(" and ", by.size() - 1, " more") : "");
  };

  // 3. The blobs on disk: each referenced (else garbage), of its recorded size, hashing to its name.
  std::vector<std::string> stray;
  std::set<std::string> present;
  const std::vector<std::string> blobs = blobs_->BlobNames(&stray);
  for (const std::string& path : stray) {
    add("stray_file", path, "not a blob's name or place; nothing can read it", r.repair() && blobs_->RemoveStray(path).ok());
  }
  for (const std::string& sha : blobs) {
    out.set_blobs(out.blobs() + 1);
    if (!named.count(sha)) {
      absl::StatusOr<bool> referenced = store_->IsBlobReferenced(sha);  // uploads: open, and committed (history)
      if (!referenced.ok()) return referenced.status();
      if (!*referenced) {
        // Again, exclusive with commits: one may have begun on these same bytes since, or be
        // dropping a module it refused (not a finding).
        std::unique_lock<std::shared_mutex> gc_lock(blob_gc_mu_);
        absl::StatusOr<bool> again = store_->IsBlobReferenced(sha);
        if (!again.ok()) return again.status();
        if (!blobs_->Has(sha)) continue;
        if (!*again) {
          if (r.repair()) blobs_->RemoveBlob(sha);
          add("unreferenced_blob", sha, "no expert, anchor, release or upload refers to it", r.repair());
          continue;
        }
      }
    }
    present.insert(sha);
    absl::StatusOr<uint64_t> size = blobs_->Size(sha);
    if (named.count(sha) && (!size.ok() || static_cast<int64_t>(*size) != named[sha].size)) {
      add("damaged_blob", sha, absl::StrCat("holds ", size.ok() ? *size : 0, " bytes where ", who_names(sha), " says ", named[sha].size,
                                            "; restore it from a backup"), false);
      continue;
    }
    if (r.skip_hashes()) continue;
    absl::StatusOr<std::string> hash = blobs_->HashBlob(sha, &stopping_);
    if (!hash.ok()) {
      if (absl::IsCancelled(hash.status())) return hash.status();
      add("damaged_blob", sha, absl::StrCat(hash.status().message(), "; restore it from a backup"), false);
      continue;
    }
    out.set_bytes_hashed(out.bytes_hashed() + static_cast<int64_t>(size.ok() ? *size : 0));
    if (*hash != sha) {
      add("damaged_blob", sha, absl::StrCat("its bytes hash to ", hash->substr(0, 12), "…; restore it from a backup",
                                            named.count(sha) ? absl::StrCat(" (", who_names(sha), ")") : ""), false);
    }
  }
  for (const auto& [sha, n] : named) {
    if (present.count(sha)) continue;
    const bool module = n.by[0].rfind("expert ", 0) == 0 || n.by[0].rfind("release ", 0) == 0;
    add("missing_blob", sha, absl::StrCat(who_names(sha), " names it, the store does not hold it; restore it from a backup",
                                          module ? " (or its owner pushes the expert again)" : " (or publish the anchor again)"), false);
  }

  // 4. Chunk manifests: each beside its blob (a lost one is recomputed; a stray one is garbage).
  for (const std::string& file : blobs_->ManifestFiles()) {
    const std::string sha = file.size() > 5 && file.substr(file.size() - 5) == ".json" ? file.substr(0, file.size() - 5) : "";
    if (IsValidSha256(sha) && blobs_->Has(sha)) continue;
    std::unique_lock<std::shared_mutex> gc_lock(blob_gc_mu_);  // a commit may be dropping blob and manifest
    if (!fs::exists(fs::path(blobs_->root()) / "manifests" / file) || (IsValidSha256(sha) && blobs_->Has(sha))) continue;
    add("stray_manifest", file, "a chunk manifest without its blob", r.repair() && blobs_->RemoveStray("manifests/" + file).ok());
  }

  // 5. Experts agree with their uploads: a module only after a committed upload of it; the state
  // says whether there is one.
  absl::StatusOr<std::vector<UploadRecord>> uploads = store_->ListUploads(std::numeric_limits<int>::max());
  if (!uploads.ok()) return uploads.status();
  std::set<std::pair<std::string, std::string>> committed;
  for (const UploadRecord& u : *uploads) {
    if (u.state == "committed" && !u.expert_id.empty()) committed.insert({u.expert_id, u.blob_sha256});
  }
  for (const ExpertRecord& e : *experts) {
    const bool has_module = !e.module_sha256.empty();
    if (e.state == "registered" && has_module) add("expert_inconsistent", e.expert_id, "registered, yet it has a module", false);
    if ((e.state == "uploaded" || e.state == "active" || e.state == "disabled") && !has_module) {
      add("expert_inconsistent", e.expert_id, absl::StrCat(e.state, ", yet it has no module"), false);
    }
    if (has_module && !committed.count({e.expert_id, e.module_sha256})) {
      add("expert_inconsistent", e.expert_id, absl::StrCat("its module ", e.module_sha256.substr(0, 12), " has no committed upload"), false);
    }
  }
  // Every check is audited, read-only ones too; where the log cannot take the event (a full disk),
  // the check says so instead of passing unrecorded.
  const int64_t repaired = out.findings_size() - out.unrepaired();
  if (absl::Status s = TryAudit(who, "store.check", {{"repair", r.repair() ? "yes" : "no"}, {"hashes", r.skip_hashes() ? "no" : "yes"}},
                                absl::StrCat("ok: ", out.findings_size(), " finding(s), ", repaired, " repaired"));
      !s.ok()) {
    add("audit_log", "audit.jsonl", absl::StrCat("this check could not be recorded: ", s.message()), false);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.store_problems = out.unrepaired();
  }
  return out;
}

namespace {

v1::Release ReleaseToProto(const ReleaseRecord& r) {
  v1::Release out;
  out.set_release_id(r.release_id);
  out.set_manifest_json(r.manifest_json);
  out.set_manifest_sha256(r.manifest_sha256);
  out.set_created_unix(r.created_unix);
  return out;
}

}  // namespace

absl::StatusOr<v1::Release> Coordinator::BuildRelease(const PeerIdentity& who, const v1::BuildReleaseRequest& r) {
  std::lock_guard<std::mutex> lock(release_mu_);
  absl::StatusOr<AnchorRecord> anchor = store_->GetAnchor("");
  if (!anchor.ok()) return anchor.status();
  absl::StatusOr<std::vector<ExpertRecord>> all = store_->ListExperts();
  if (!all.ok()) return all.status();
  std::vector<ExpertRecord> active;
  for (const ExpertRecord& e : *all) {
    if (e.state == "active" && e.anchor_id == anchor->anchor_id) active.push_back(e);
  }
  std::sort(active.begin(), active.end(), [](const ExpertRecord& a, const ExpertRecord& b) {
    return std::tie(a.created_unix, a.expert_id) < std::tie(b.created_unix, b.expert_id);
  });
  ReleaseManifest m;
  for (const std::string& id : r.exclude()) {
    auto it = std::find_if(all->begin(), all->end(), [&](const ExpertRecord& e) { return e.expert_id == id; });
    if (it == all->end()) return absl::NotFoundError(absl::StrCat("--exclude ", id, ": no such expert (see `flexfedctl expert list`)"));
    if (std::none_of(active.begin(), active.end(), [&](const ExpertRecord& e) { return e.expert_id == id; })) {
      return absl::InvalidArgumentError(absl::StrCat("--exclude ", id, ": the expert is ", it->state,
                                                     ", not active on the current anchor, so no release includes it anyway"));
    }
    m.excluded.push_back(id);
  }
  for (const ExpertRecord& e : active) {
    if (std::find(m.excluded.begin(), m.excluded.end(), e.expert_id) != m.excluded.end()) continue;
    m.experts.push_back({static_cast<int64_t>(m.experts.size()) + 1, e.expert_id, e.owner_id, e.name, e.domain,
                         e.module_sha256, e.module_size, e.tokens_trained});
  }
  if (m.experts.empty()) {
    return absl::FailedPreconditionError(
        "no active expert is left for a release; enable uploaded experts with `flexfedctl expert enable`");
  }
  m.top_k = r.top_k() == 0 ? m.num_experts() : r.top_k();
  if (m.top_k < 1 || m.top_k > m.num_experts()) {
    return absl::InvalidArgumentError(absl::StrCat("--k ", r.top_k(), " is outside 1..", m.num_experts(), " (this release has ",
                                                   m.num_experts(), " experts, the public one included)"));
  }
  absl::StatusOr<std::vector<ReleaseRecord>> existing = store_->ListReleases();
  if (!existing.ok()) return existing.status();
  m.release_id = ReleaseIdForNumber(static_cast<int64_t>(existing->size()) + 1);
  m.anchor_id = anchor->anchor_id;
  m.created_unix = Now();
  m.note = r.note();
  const std::string text = m.ToJson();
  ReleaseRecord record{m.release_id, m.anchor_id, text, Sha256Hex(text), m.created_unix};
  absl::Status s = store_->AddRelease(record);
  std::map<std::string, std::string> objects = {{"release", m.release_id}, {"manifest", record.manifest_sha256}};
  Audit(who, "release.build", objects, s.ok() ? "ok" : std::string(s.message()));
  if (!s.ok()) return s;
  return ReleaseToProto(record);
}

absl::StatusOr<v1::Release> Coordinator::GetRelease(const std::string& release_id) {
  if (release_id.empty()) {
    absl::StatusOr<std::vector<ReleaseRecord>> all = store_->ListReleases();
    if (!all.ok()) return all.status();
    if (all->empty()) return absl::NotFoundError("no release has been built yet; build one with `flexfedctl release build`");
    return ReleaseToProto(all->back());
  }
  absl::StatusOr<ReleaseRecord> r = store_->GetRelease(release_id);
  if (!r.ok()) return r.status();
  return ReleaseToProto(*r);
}

absl::StatusOr<v1::ListReleasesResponse> Coordinator::ListReleases() {
  absl::StatusOr<std::vector<ReleaseRecord>> all = store_->ListReleases();
  if (!all.ok()) return all.status();
  v1::ListReleasesResponse out;
  for (const ReleaseRecord& r : *all) *out.add_releases() = ReleaseToProto(r);
  return out;
}

absl::StatusOr<v1::UploadStatus> Coordinator::BeginUpload(const PeerIdentity& who, const std::string& expert_id,
                                                          const v1::Manifest& manifest) {
  ChunkLayout layout = FromProto(manifest);
  if (absl::Status s = layout.Validate(); !s.ok()) return s;
  if (expert_id.empty()) {
    if (who.role != "admin") return Denied("only operators upload blobs without an expert");
  } else {
    absl::StatusOr<ExpertRecord> e = store_->GetExpert(expert_id);
    if (!e.ok()) return absl::NotFoundError(absl::StrCat("no expert '", expert_id, "'; the operator registers it first"));
    if (who.role != "owner" || e->owner_id != who.id) {
      Audit(who, "upload.begin", {{"expert", expert_id}}, "denied: not the expert's owner");
      return Denied(absl::StrCat("expert '", expert_id, "' belongs to another owner"));
    }
    if (e->state == "retired") return absl::FailedPreconditionError(absl::StrCat("expert '", expert_id, "' is retired"));
    absl::StatusOr<ModelConfig> config = AnchorConfig(e->anchor_id);
    if (!config.ok()) return config.status();
    if (layout.size > ModuleBound(*config)) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++counters_.rejected_uploads["oversized"];
      }
      Audit(who, "upload.begin", {{"expert", expert_id}, {"blob", layout.sha256}}, "rejected: oversized");
      return absl::InvalidArgumentError(absl::StrCat("a module of ", layout.size, " bytes exceeds the ", ModuleBound(*config),
                                                     " an expert of this anchor can take (rejection: oversized)"));
    }
  }
  // The session id is a function of (caller, expert, blob): re-declaring the same upload after a
  // restart of either side finds the same session and the chunks already received.
  const std::string session = Sha256Hex(absl::StrCat(who.role, "\n", who.id, "\n", expert_id, "\n", layout.sha256)).substr(0, 32);
  // From here to the record of this upload, one BeginUpload per expert at a time.
  std::unique_lock<std::mutex> expert_lock(ExpertLock(expert_id), std::defer_lock);
  if (!expert_id.empty()) expert_lock.lock();
  absl::StatusOr<UploadRecord> existing = store_->GetUpload(session);
  // A module pushed again after a newer one superseded it starts over; so does one refused under
  // a privacy policy that is no longer the operator's (checked again under today's).
  const bool reopening = existing.ok() && existing->state == "rejected" &&
                         (existing->rejection == "superseded" ||
                          (existing->rejection == "privacy_policy" && existing->policy != PolicyFingerprint(options_.privacy_policy)));
  if ((!existing.ok() || reopening) && !expert_id.empty()) {
    // One open upload per expert: a new module replaces an unfinished push of an older one, so an
    // owner's partial uploads take at most one module's room per expert on the coordinator's disk.
    absl::StatusOr<std::vector<UploadRecord>> uploads = store_->OpenUploadsOf(expert_id);
    if (!uploads.ok()) return uploads.status();
    for (const UploadRecord& old : *uploads) {
      if (old.session_id == session) continue;
      std::unique_lock<std::shared_mutex> old_lock(SessionLock(old.session_id));
      absl::StatusOr<UploadRecord> again = store_->GetUpload(old.session_id);
      if (!again.ok() || again->state != "open") continue;  // committed meanwhile
      again->state = "rejected";
      again->rejection = "superseded";
      again->message = absl::StrCat("a newer module (", layout.sha256.substr(0, 12), ") was pushed for this expert before this one was committed");
      again->updated_unix = Now();
      if (absl::Status st = store_->UpdateUpload(*again); !st.ok()) return st;
      blobs_->DropSession(old.session_id);
      Audit(who, "upload.superseded", {{"expert", expert_id}, {"blob", old.blob_sha256}, {"session", old.session_id}}, "ok");
    }
  }
  if (reopening) {
    std::unique_lock<std::shared_mutex> lock(SessionLock(session));
    existing->state = "open";
    existing->rejection.clear();
    existing->message.clear();
    existing->policy.clear();
    existing->manifest_json = ManifestJson(layout);
    existing->updated_unix = Now();
    if (absl::Status st = store_->UpdateUpload(*existing); !st.ok()) return st;
    Audit(who, "upload.begin", {{"expert", expert_id}, {"blob", layout.sha256}, {"session", session}}, "ok: again");
  }
  // The same blob declared again in other chunks (another client, another chunk size): the session
  // takes the new layout and starts over, so the indices it reports missing are always the
  // caller's. (The session id names caller, expert and blob, not the chunking.)
  if (existing.ok() && existing->state == "open" && existing->manifest_json != ManifestJson(layout)) {
    std::unique_lock<std::shared_mutex> lock(SessionLock(session));
    blobs_->DropSession(session);
    existing->manifest_json = ManifestJson(layout);
    existing->updated_unix = Now();
    if (absl::Status st = store_->UpdateUpload(*existing); !st.ok()) return st;
    Audit(who, "upload.begin", {{"expert", expert_id}, {"blob", layout.sha256}, {"session", session}},
          absl::StrCat("ok: declared again in chunks of ", layout.chunk_size, " bytes; the chunks received before were dropped"));
  }
  if (!existing.ok()) {
    const int64_t now = Now();
    UploadRecord u{session, expert_id, who.id, ManifestJson(layout), layout.sha256, static_cast<int64_t>(layout.size),
                   "open", "", "", now, now};
    if (absl::Status s = store_->AddUpload(u); !s.ok()) {
      if (!absl::IsAlreadyExists(s)) return s;
      // The same session recorded meanwhile is this upload; another session is another open upload
      // of the expert, begun at the same moment through another coordinator (the store's index
      // keeps one): the caller begins again and finds it superseded or its own.
      if (!store_->GetUpload(session).ok()) {
        return absl::AbortedError(absl::StrCat("another upload of expert '", expert_id, "' began at the same moment; begin again"));
      }
    } else {
      Audit(who, "upload.begin", {{"expert", expert_id}, {"blob", layout.sha256}, {"session", session}}, "ok");
    }
  }
  expert_lock = {};
  return QueryMissing(who, session);
}

// A session belongs to a caller by identity *and* role: an operator's blob session (no expert) to an
// admin of that id, an expert's to the owner of that id. An owner whose id equals an operator's
// (owner ids are chosen by operators and may be "admin") cannot reach the operator's sessions.
static bool SessionBelongsTo(const UploadRecord& u, const PeerIdentity& who) {
  return u.owner_id == who.id && who.role == (u.expert_id.empty() ? "admin" : "owner");
}

absl::StatusOr<v1::UploadStatus> Coordinator::QueryMissing(const PeerIdentity& who, const std::string& session) {
  absl::StatusOr<UploadRecord> u = store_->GetUpload(session);
  if (!u.ok()) return u.status();
  if (!SessionBelongsTo(*u, who)) return Denied("this upload session belongs to another caller");
  absl::StatusOr<ChunkLayout> layout = ManifestFromJson(u->manifest_json);
  if (!layout.ok()) return layout.status();
  v1::UploadStatus out;
  out.set_session_id(session);
  if (u->state == "open") {
    for (uint64_t i : blobs_->MissingChunks(session, *layout)) out.add_missing(i);
    out.set_received_bytes(blobs_->ReceivedBytes(session, *layout));
  } else {
    out.set_received_bytes(layout->size);
  }
  return out;
}

absl::StatusOr<v1::UploadStatus> Coordinator::PutChunk(const PeerIdentity& who, const v1::UploadChunk& c) {
  // The state is read and the chunk written under the session's lock (shared with other chunks,
  // exclusive with commit): a chunk racing a commit either lands before it or sees it committed.
  std::shared_lock<std::shared_mutex> session_lock(SessionLock(c.session_id()));
  absl::StatusOr<UploadRecord> u = store_->GetUpload(c.session_id());
  if (!u.ok()) return u.status();
  if (!SessionBelongsTo(*u, who)) return Denied("this upload session belongs to another caller");
  if (u->state != "open") return QueryMissing(who, c.session_id());  // already done: nothing to add
  absl::StatusOr<ChunkLayout> layout = ManifestFromJson(u->manifest_json);
  if (!layout.ok()) return layout.status();
  if (c.index() >= layout->chunk_sha256.size()) return absl::OutOfRangeError(absl::StrCat("chunk index ", c.index(), " is past the manifest"));
  if (absl::Status s = blobs_->PutChunk(c.session_id(), *layout, c.index(), c.data()); !s.ok()) {
    if (absl::IsDataLoss(s)) {
      std::lock_guard<std::mutex> lock(mu_);
      ++counters_.rejected_uploads["corrupt_chunk"];
    }
    return s;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.bytes_in += static_cast<int64_t>(c.data().size());
  }
  v1::UploadStatus out;
  out.set_session_id(c.session_id());
  return out;
}

absl::StatusOr<v1::CommitUploadResponse> Coordinator::CommitUpload(const PeerIdentity& who, const std::string& session) {
  std::unique_lock<std::shared_mutex> session_lock(SessionLock(session));
  absl::StatusOr<UploadRecord> u = store_->GetUpload(session);
  if (!u.ok()) return u.status();
  if (!SessionBelongsTo(*u, who)) return Denied("this upload session belongs to another caller");
  // Idempotent: a retry after a lost reply gets the recorded outcome.
  v1::CommitUploadResponse out;
  out.mutable_blob()->set_sha256(u->blob_sha256);
  out.mutable_blob()->set_size(static_cast<uint64_t>(u->blob_size));
  if (u->state == "committed" || u->state == "rejected") {
    if (!u->expert_id.empty()) {
      absl::StatusOr<ExpertRecord> e = store_->GetExpert(u->expert_id);
      if (e.ok()) *out.mutable_expert() = ToProto(*e);
    }
    out.set_rejection(u->rejection);
    out.set_message(u->message);
    if (u->rejection == "privacy_policy" && u->policy != PolicyFingerprint(options_.privacy_policy)) {
      out.set_message(absl::StrCat(u->message, " (refused under an earlier privacy policy: push the module again to have it checked "
                                               "under the current one)"));
    }
    return out;
  }
  absl::StatusOr<ChunkLayout> layout = ManifestFromJson(u->manifest_json);
  if (!layout.ok()) return layout.status();
  std::vector<uint64_t> missing = blobs_->MissingChunks(session, *layout);
  if (!missing.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(missing.size(), " chunk(s) still missing (first: ", missing[0], "); send them, then commit"));
  }
  // From here until the blob is recorded, the store check must not take it for unreferenced.
  std::shared_lock<std::shared_mutex> gc_lock(blob_gc_mu_);
  if (absl::Status s = blobs_->Assemble(session, *layout); !s.ok()) return s;
  // The session's chunks go only once the outcome is recorded: a commit that fails before (a full
  // disk, the database) is retried with nothing sent again.
  if (u->expert_id.empty()) {  // an operator's blob
    u->state = "committed";
    u->updated_unix = Now();
    if (absl::Status s = store_->UpdateUpload(*u); !s.ok()) return s;
    blobs_->DropSession(session);
    Audit(who, "blob.commit", {{"blob", layout->sha256}}, "ok");
    return out;
  }
  absl::StatusOr<v1::CommitUploadResponse> committed = CommitModule(who, *std::move(u));
  if (committed.ok()) blobs_->DropSession(session);
  return committed;
}

absl::StatusOr<v1::CommitUploadResponse> Coordinator::CommitModule(const PeerIdentity& who, UploadRecord u) {
  v1::CommitUploadResponse out;
  out.mutable_blob()->set_sha256(u.blob_sha256);
  out.mutable_blob()->set_size(static_cast<uint64_t>(u.blob_size));
  absl::StatusOr<ExpertRecord> e = store_->GetExpert(u.expert_id);
  if (!e.ok()) return e.status();
  // The anchor the expert was registered for: an error reading it is the coordinator's, not the
  // module's, so it fails the commit (retryable) instead of rejecting the upload.
  absl::StatusOr<ModelConfig> config = AnchorConfig(e->anchor_id);
  if (!config.ok()) return config.status();
  // Validate the module against that anchor, before it is visible.
  absl::Status verdict = [&]() -> absl::Status {
    const Dtype dtype = config->torch_dtype == "float32" ? Dtype::kF32 : config->torch_dtype == "float16" ? Dtype::kF16 : Dtype::kBF16;
    absl::StatusOr<ExpertModuleMetadata> meta = ValidateExpertModule(blobs_->PathOf(u.blob_sha256), *config, dtype, e->anchor_id);
    if (!meta.ok()) return meta.status();
    // The operator's privacy policy, after the module is known to be well-formed.
    if (absl::Status s = CheckPrivacyPolicy(*meta, options_.privacy_policy); !s.ok()) return s;
    e->tokens_trained = meta->tokens_trained;
    return absl::OkStatus();
  }();
  u.updated_unix = Now();
  if (!verdict.ok()) {
    std::string reason = RejectionReason(verdict);
    if (reason.empty()) reason = "invalid";
    u.state = "rejected";
    u.rejection = reason;
    if (reason == "privacy_policy") u.policy = PolicyFingerprint(options_.privacy_policy);
    // The owner sees its module named by hash, never the server's path to the blob.
    u.message = absl::StrReplaceAll(verdict.message(), {{blobs_->PathOf(u.blob_sha256), absl::StrCat("module ", u.blob_sha256.substr(0, 12))}});
    if (absl::Status s = store_->UpdateUpload(u); !s.ok()) return s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++counters_.rejected_uploads[reason];
    }
    Audit(who, "upload.commit", {{"expert", u.expert_id}, {"blob", u.blob_sha256}}, "rejected: " + reason);
    DropIfUnreferenced(u.blob_sha256);  // a rejected module is not kept
    *out.mutable_expert() = ToProto(*e);
    out.set_rejection(reason);
    out.set_message(u.message);
    return out;
  }
  u.state = "committed";
  e->module_sha256 = u.blob_sha256;
  e->module_size = u.blob_size;
  if (e->state == "registered") e->state = "uploaded";
  e->updated_unix = u.updated_unix;
  if (absl::Status s = store_->CommitModule(u, *e); !s.ok()) {
    if (!absl::IsFailedPrecondition(s)) return s;
    // Retired while the module was in flight: the upload is refused, the expert untouched.
    u.state = "rejected";
    u.rejection = "retired";
    u.message = std::string(s.message());
    if (absl::Status st = store_->UpdateUpload(u); !st.ok()) return st;
    DropIfUnreferenced(u.blob_sha256);
    Audit(who, "upload.commit", {{"expert", u.expert_id}, {"blob", u.blob_sha256}}, "rejected: retired");
    out.set_rejection(u.rejection);
    out.set_message(u.message);
  } else {
    std::lock_guard<std::mutex> lock(mu_);
    ++counters_.committed_uploads;
  }
  if (u.state == "committed") Audit(who, "upload.commit", {{"expert", u.expert_id}, {"blob", u.blob_sha256}}, "ok");
  // What the expert is now (a state change may have come in while the module was validated).
  absl::StatusOr<ExpertRecord> now = store_->GetExpert(u.expert_id);
  *out.mutable_expert() = ToProto(now.ok() ? *now : *e);
  return out;
}

void Coordinator::DropIfUnreferenced(const std::string& sha256) {
  absl::StatusOr<bool> referenced = store_->IsBlobReferenced(sha256);
  if (referenced.ok() && !*referenced) blobs_->RemoveBlob(sha256);
}

absl::StatusOr<ModelConfig> Coordinator::ConfigFromBlob(const v1::BlobRef& blob) {
  absl::StatusOr<std::string> text = blobs_->Read(blob.sha256(), 0, blob.size());
  if (!text.ok()) return text.status();
  return ModelConfig::FromJson(json::parse(*text, nullptr, false), "anchor config.json");
}

absl::StatusOr<ModelConfig> Coordinator::AnchorConfig(const std::string& anchor_id) {
  absl::StatusOr<v1::Anchor> anchor = GetAnchor(anchor_id);
  if (!anchor.ok()) return anchor.status();
  for (const v1::AnchorFile& f : anchor->files()) {
    if (f.name() == "config.json") return ConfigFromBlob(f.blob());
  }
  // PublishAnchor refuses an anchor without one: the store is damaged.
  return absl::DataLossError(absl::StrCat("anchor ", anchor_id, " has no config.json in the coordinator's store; "
                                          "restore the store from a backup or publish the anchor again"));
}

absl::StatusOr<v1::Expert> Coordinator::GetExpert(const PeerIdentity& who, const std::string& expert_id) {
  absl::StatusOr<ExpertRecord> e = store_->GetExpert(expert_id);
  if (!e.ok()) return e.status();
  if (who.role != "admin" && e->owner_id != who.id) return Denied(absl::StrCat("expert '", expert_id, "' belongs to another owner"));
  return ToProto(*e);
}

absl::StatusOr<v1::Manifest> Coordinator::GetManifest(const PeerIdentity& who, const std::string& sha256) {
  if (absl::StatusOr<std::string> probe = ReadBlob(who, sha256, 0, 0); !probe.ok()) return probe.status();
  absl::StatusOr<ChunkLayout> layout = blobs_->Manifest(sha256);
  if (!layout.ok()) return layout.status();
  return ToProto(*layout);
}

absl::StatusOr<std::string> Coordinator::ReadBlob(const PeerIdentity& who, const std::string& sha256, uint64_t offset,
                                                  uint64_t length) {
  if (who.role != "admin") {
    // Owners read anchor files only, and learn nothing else: not whether any other blob exists
    // (the same answer for another owner's module and for no blob at all).
    absl::StatusOr<std::vector<AnchorRecord>> anchors = store_->ListAnchors();
    if (!anchors.ok()) return anchors.status();
    const bool anchor_file = IsValidSha256(sha256) && std::any_of(anchors->begin(), anchors->end(), [&](const AnchorRecord& a) {
      return a.files_json.find("\"" + sha256 + "\"") != std::string::npos;
    });
    if (!anchor_file) return absl::NotFoundError(absl::StrCat("no anchor file ", sha256.substr(0, 64), "; owners download anchor files only"));
  }
  if (!blobs_->Has(sha256)) return absl::NotFoundError(absl::StrCat("no blob ", sha256.substr(0, 64)));
  absl::StatusOr<std::string> data = blobs_->Read(sha256, offset, length);
  if (data.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.bytes_out += static_cast<int64_t>(data->size());
  }
  return data;
}

absl::StatusOr<std::string> Coordinator::ReadChunk(const PeerIdentity& who, const ChunkLayout& layout, uint64_t index) {
  if (index >= layout.chunk_sha256.size()) return absl::OutOfRangeError(absl::StrCat("chunk ", index, " is past the blob"));
  absl::StatusOr<std::string> data = ReadBlob(who, layout.sha256, index * layout.chunk_size, layout.ChunkBytes(index));
  if (!data.ok()) return data.status();
  if (data->size() != layout.ChunkBytes(index) || Sha256Hex(*data) != layout.chunk_sha256[index]) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++counters_.damaged_reads;
    }
    std::fprintf(stderr, "%s\n", json({{"level", "error"}, {"event", "damaged_blob_read"}, {"blob", layout.sha256},
                                       {"chunk", index}, {"reader", who.role + "/" + who.id}}).dump().c_str());
    return absl::DataLossError(absl::StrCat("the coordinator's stored copy of blob ", layout.sha256.substr(0, 12), "… is damaged (chunk ",
                                            index, " no longer matches its hash); nothing of it was sent. Tell the operator: "
                                            "`flexfedctl status --check` reports it, and a backup (or a new upload of the same bytes) repairs it"));
  }
  return data;
}

absl::Status Coordinator::Heartbeat(const PeerIdentity& who, const v1::HeartbeatRequest&) {
  if (who.role != "owner") return absl::OkStatus();
  return store_->TouchOwner(who.id, Now());  // last_seen only: a heartbeat never rewrites the owner
}

}  // namespace flexfed
