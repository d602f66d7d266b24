#include "coordinator/service.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/core/identity.h"
#include "coordinator/service_parts.h"
#include "coordinator/transfer_streams.h"
#include "flexfed/v1/flexfed.grpc.pb.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

using grpc::CallbackServerContext;
using grpc::ServerUnaryReactor;

std::string ProtocolHeader(CallbackServerContext* ctx) {
  auto it = ctx->client_metadata().find(kProtocolHeader);
  return it == ctx->client_metadata().end() ? "" : std::string(it->second.data(), it->second.size());
}

std::string PeerCertificate(CallbackServerContext* ctx) {
  std::string pem;
  if (auto auth = ctx->auth_context(); auth) {
    for (const grpc::string_ref& v : auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME)) pem.assign(v.data(), v.size());
  }
  return pem;
}

// Runs `body` for an authorized caller on the work queue and finishes the unary call with its
// status there. Admission comes first, on gRPC's thread (CallerOf, and the caller's share of calls in
// flight), so a caller without a certificate or over its share queues nothing. `body` captures by
// value: the handler has returned by the time it runs (the request and response stay valid until Finish).
template <typename Body>
ServerUnaryReactor* Unary(const ServiceParts& parts, CallbackServerContext* ctx, const std::string& role, Body body) {
  ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<std::string> caller = CallerOf(ctx);
  if (caller.ok() && !parts.calls->TryEnter(*caller)) caller = TooManyInFlight("calls", *caller, parts.calls->per_key());
  if (!caller.ok()) {
    reactor->Finish(ToGrpc(caller.status()));
    return reactor;
  }
  parts.work->Post([parts, ctx, role, reactor, caller = *caller, body = std::move(body)]() mutable {
    absl::Status status;
    try {
      absl::StatusOr<PeerIdentity> who = Authorize(parts.coordinator, ctx, role);
      status = who.ok() ? body(*who) : who.status();
    } catch (const std::exception& e) {
      status = HandlerFailed(ctx, e.what());
    } catch (...) {
      status = HandlerFailed(ctx, "an exception of unknown type");
    }
    parts.calls->Leave(caller);
    reactor->Finish(ToGrpc(status));
  });
  return reactor;
}

// Copies a StatusOr's value into the response.
template <typename T>
absl::Status Fill(absl::StatusOr<T> result, T* response) {
  if (!result.ok()) return result.status();
  *response = *std::move(result);
  return absl::OkStatus();
}

// Enrollment comes without a client certificate: the one call an unknown peer can make. It is
// admitted against one limit for all callers together (each refused attempt is audited, with an
// fdatasync), so a flood of enrollments queues a bounded amount of work.
class EnrollmentService final : public v1::Enrollment::CallbackService {
 public:
  explicit EnrollmentService(const ServiceParts& parts) : parts_(parts) {}
  ServerUnaryReactor* Enroll(CallbackServerContext* ctx, const v1::EnrollRequest* r, v1::EnrollResponse* out) override {
    ServerUnaryReactor* reactor = ctx->DefaultReactor();
    absl::Status admitted = CheckProtocolVersion(ProtocolHeader(ctx));
    if (admitted.ok() && !parts_.enrollments->TryEnter("")) {
      admitted = absl::ResourceExhaustedError(absl::StrCat("the coordinator is handling ", parts_.enrollments->per_key(),
                                                           " enrollments at once; try again in a few seconds"));
    }
    if (!admitted.ok()) {
      reactor->Finish(ToGrpc(admitted));
      return reactor;
    }
    parts_.work->Post([this, ctx, r, out, reactor] {
      absl::Status s;
      try {
        s = Fill(parts_.coordinator->Enroll(*r), out);
      } catch (const std::exception& e) {
        s = HandlerFailed(ctx, e.what());
      }
      parts_.enrollments->Leave("");
      reactor->Finish(ToGrpc(s));
    });
    return reactor;
  }

 private:
  const ServiceParts parts_;
};

class OwnerService final : public v1::Owner::CallbackService {
 public:
  explicit OwnerService(const ServiceParts& parts) : parts_(parts), c_(parts.coordinator) {}
  ServerUnaryReactor* GetAnchor(CallbackServerContext* ctx, const v1::GetAnchorRequest* r, v1::Anchor* out) override {
    return Unary(parts_, ctx, "", [=](const PeerIdentity&) { return Fill(c_->GetAnchor(r->anchor_id()), out); });
  }
  ServerUnaryReactor* GetManifest(CallbackServerContext* ctx, const v1::GetManifestRequest* r, v1::Manifest* out) override {
    return Unary(parts_, ctx, "", [=](const PeerIdentity& who) { return Fill(c_->GetManifest(who, r->sha256()), out); });
  }
  grpc::ServerWriteReactor<v1::DataChunk>* Download(CallbackServerContext* ctx, const v1::DownloadRequest* r) override {
    return NewDownloadStream(parts_, ctx, r);
  }
  ServerUnaryReactor* BeginUpload(CallbackServerContext* ctx, const v1::BeginUploadRequest* r, v1::UploadStatus* out) override {
    return Unary(parts_, ctx, "", [=](const PeerIdentity& who) {
      if (r->expert_id().empty()) return absl::InvalidArgumentError("name the expert the module is for");
      return Fill(c_->BeginUpload(who, r->expert_id(), r->manifest()), out);
    });
  }
  grpc::ServerReadReactor<v1::UploadChunk>* UploadChunks(CallbackServerContext* ctx, v1::UploadStatus* out) override {
    return NewUploadStream(parts_, ctx, out, "");
  }
  ServerUnaryReactor* QueryMissing(CallbackServerContext* ctx, const v1::QueryMissingRequest* r, v1::UploadStatus* out) override {
    return Unary(parts_, ctx, "", [=](const PeerIdentity& who) { return Fill(c_->QueryMissing(who, r->session_id()), out); });
  }
  ServerUnaryReactor* CommitUpload(CallbackServerContext* ctx, const v1::CommitUploadRequest* r, v1::CommitUploadResponse* out) override {
    return Unary(parts_, ctx, "", [=](const PeerIdentity& who) { return Fill(c_->CommitUpload(who, r->session_id()), out); });
  }
  ServerUnaryReactor* Heartbeat(CallbackServerContext* ctx, const v1::HeartbeatRequest* r, v1::HeartbeatResponse* out) override {
    return Unary(parts_, ctx, "", [=](const PeerIdentity& who) {
      out->set_server_unix(c_->Now());
      return c_->Heartbeat(who, *r);
    });
  }
  ServerUnaryReactor* GetExpert(CallbackServerContext* ctx, const v1::GetExpertRequest* r, v1::Expert* out) override {
    return Unary(parts_, ctx, "", [=](const PeerIdentity& who) { return Fill(c_->GetExpert(who, r->expert_id()), out); });
  }

 private:
  const ServiceParts parts_;
  Coordinator* const c_;
};

class AdminService final : public v1::Admin::CallbackService {
 public:
  explicit AdminService(const ServiceParts& parts) : parts_(parts), c_(parts.coordinator) {}
  ServerUnaryReactor* PublishAnchor(CallbackServerContext* ctx, const v1::PublishAnchorRequest* r, v1::Anchor* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->PublishAnchor(who, *r), out); });
  }
  ServerUnaryReactor* ListAnchors(CallbackServerContext* ctx, const v1::ListRequest*, v1::ListAnchorsResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListAnchors(), out); });
  }
  ServerUnaryReactor* AddOwner(CallbackServerContext* ctx, const v1::AddOwnerRequest* r, v1::AddOwnerResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->AddOwner(who, *r), out); });
  }
  ServerUnaryReactor* ReenrollOwner(CallbackServerContext* ctx, const v1::AddOwnerRequest* r, v1::AddOwnerResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->ReenrollOwner(who, *r), out); });
  }
  ServerUnaryReactor* ListOwners(CallbackServerContext* ctx, const v1::ListRequest*, v1::ListOwnersResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListOwners(), out); });
  }
  ServerUnaryReactor* RevokeOwner(CallbackServerContext* ctx, const v1::RevokeOwnerRequest* r, v1::OwnerInfo* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->RevokeOwner(who, *r), out); });
  }
  ServerUnaryReactor* RegisterExpert(CallbackServerContext* ctx, const v1::RegisterExpertRequest* r, v1::Expert* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->RegisterExpert(who, *r), out); });
  }
  ServerUnaryReactor* ListExperts(CallbackServerContext* ctx, const v1::ListRequest*, v1::ListExpertsResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListExperts(), out); });
  }
  ServerUnaryReactor* BuildRelease(CallbackServerContext* ctx, const v1::BuildReleaseRequest* r, v1::Release* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->BuildRelease(who, *r), out); });
  }
  ServerUnaryReactor* GetRelease(CallbackServerContext* ctx, const v1::GetReleaseRequest* r, v1::Release* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->GetRelease(r->release_id()), out); });
  }
  ServerUnaryReactor* ListReleases(CallbackServerContext* ctx, const v1::ListRequest*, v1::ListReleasesResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListReleases(), out); });
  }
  ServerUnaryReactor* SetExpertState(CallbackServerContext* ctx, const v1::SetExpertStateRequest* r, v1::Expert* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->SetExpertState(who, *r), out); });
  }
  ServerUnaryReactor* ListUploads(CallbackServerContext* ctx, const v1::ListRequest* r, v1::ListUploadsResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListUploads(r->limit()), out); });
  }
  ServerUnaryReactor* TailAudit(CallbackServerContext* ctx, const v1::TailAuditRequest* r, v1::TailAuditResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->TailAudit(r->limit(), r->skip()), out); });
  }
  ServerUnaryReactor* GetStatus(CallbackServerContext* ctx, const v1::GetStatusRequest*, v1::StatusResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->Status(), out); });
  }
  ServerUnaryReactor* CheckStore(CallbackServerContext* ctx, const v1::CheckStoreRequest* r, v1::CheckStoreResponse* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->CheckStore(who, *r), out); });
  }
  ServerUnaryReactor* BeginBlobUpload(CallbackServerContext* ctx, const v1::Manifest* r, v1::UploadStatus* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->BeginUpload(who, "", *r), out); });
  }
  grpc::ServerReadReactor<v1::UploadChunk>* UploadBlobChunks(CallbackServerContext* ctx, v1::UploadStatus* out) override {
    return NewUploadStream(parts_, ctx, out, "admin");  // operators only; the session says whose upload it is
  }
  ServerUnaryReactor* CommitBlob(CallbackServerContext* ctx, const v1::CommitUploadRequest* r, v1::BlobRef* out) override {
    return Unary(parts_, ctx, "admin", [=](const PeerIdentity& who) -> absl::Status {
      absl::StatusOr<v1::CommitUploadResponse> committed = c_->CommitUpload(who, r->session_id());
      if (!committed.ok()) return committed.status();
      *out = committed->blob();
      return absl::OkStatus();
    });
  }

 private:
  const ServiceParts parts_;
  Coordinator* const c_;
};

}  // namespace

namespace {

// The served data directory, as given and absolute: replaced by "DATA" in every message a caller
// sees (an owner has no business learning the server's file layout).
std::mutex& HiddenMutex() {
  static std::mutex m;
  return m;
}
std::vector<std::string>& HiddenPaths() {
  static std::vector<std::string> paths;
  return paths;
}

}  // namespace

absl::StatusOr<std::string> CallerOf(CallbackServerContext* ctx) {
  if (absl::Status s = CheckProtocolVersion(ProtocolHeader(ctx)); !s.ok()) return s;
  const std::string pem = PeerCertificate(ctx);
  if (pem.empty()) return absl::UnauthenticatedError("no client certificate: enroll first (flexfed-owner enroll)");
  absl::StatusOr<PeerIdentity> id = ReadIdentity(pem);
  if (!id.ok()) return absl::UnauthenticatedError(std::string(id.status().message()));
  return id->role + "/" + id->id;
}

absl::StatusOr<PeerIdentity> Authorize(Coordinator* c, CallbackServerContext* ctx, const std::string& role, std::string* pem_out) {
  if (absl::Status s = CheckProtocolVersion(ProtocolHeader(ctx)); !s.ok()) return s;
  const std::string pem = PeerCertificate(ctx);
  absl::StatusOr<PeerIdentity> who = c->Authenticate(pem);
  if (!who.ok()) return who.status();
  if (pem_out != nullptr) *pem_out = pem;
  if (role == "admin" && who->role != "admin") {
    return absl::PermissionDeniedError("this call is for operators (an admin certificate from `flexfedctl ca init`)");
  }
  return who;
}

absl::Status HandlerFailed(CallbackServerContext* ctx, const char* what) {
  // Bytes that are not UTF-8 are replaced; never gRPC's UNIMPLEMENTED "".
  const nlohmann::json line = {{"level", "error"}, {"event", "handler_exception"}, {"peer", ctx->peer()}, {"what", what}};
  std::fprintf(stderr, "%s\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  return absl::InternalError("the coordinator failed to handle this call (logged); retry later or tell the operator");
}

absl::Status TooManyInFlight(const std::string& what, const std::string& caller, int limit) {
  return absl::ResourceExhaustedError(absl::StrCat(caller, " already has ", limit, " ", what,
                                                   " in progress at the coordinator (the limit); wait for one to finish"));
}

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  std::string message(s.message());
  {
    std::lock_guard<std::mutex> lock(HiddenMutex());
    for (const std::string& path : HiddenPaths()) message = absl::StrReplaceAll(message, {{path, "DATA"}});
  }
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), message);
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::Status CheckProtocolVersion(const std::string& v) {
  const size_t dot = v.find('.');
  int major = -1;
  try {
    major = std::stoi(v.substr(0, dot));
  } catch (const std::exception&) {
  }
  if (v.empty() || dot == std::string::npos || major != kProtocolMajor) {
    return absl::FailedPreconditionError(absl::StrCat("protocol version '", v, "' is not compatible with this coordinator's ",
                                                      kProtocolMajor, ".", kProtocolMinor,
                                                      "; use a FlexFed client of the same major version"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(Coordinator* c, const ServerOptions& o) {
  std::unique_ptr<CoordinatorServer> server(new CoordinatorServer());
  if (!c->data_dir().empty()) {
    std::lock_guard<std::mutex> lock(HiddenMutex());
    std::error_code ec;
    const std::string absolute = std::filesystem::absolute(c->data_dir(), ec).lexically_normal().string();
    // Longest first, so a relative path inside the absolute one is not half-replaced.
    for (const std::string& p : {absolute, c->data_dir()}) {
      if (!p.empty() && std::find(HiddenPaths().begin(), HiddenPaths().end(), p) == HiddenPaths().end()) HiddenPaths().push_back(p);
    }
    std::sort(HiddenPaths().begin(), HiddenPaths().end(), [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  }
  // Blocking work runs here, not on gRPC's threads: chunk hashing and fdatasync, blob reads, commit
  // hashing passes and database transactions. Enough threads that disk waits overlap.
  const int threads = o.work_threads > 0 ? o.work_threads : std::max(8, 2 * static_cast<int>(std::thread::hardware_concurrency()));
  server->work_ = std::make_unique<WorkQueue>(threads);
  server->slots_ = std::make_unique<ChunkSlots>(o.chunk_slots, o.chunk_slots_per_caller, server->work_.get());
  server->watchdog_ = std::make_unique<StreamWatchdog>(static_cast<int64_t>(o.idle_timeout_seconds) * 1000, o.steady_clock_ms);
  server->streams_ = std::make_unique<InFlightLimit>(o.streams_per_caller);
  server->calls_ = std::make_unique<InFlightLimit>(o.calls_per_caller);
  server->enrollments_ = std::make_unique<InFlightLimit>(o.enrollments_in_flight);
  const ServiceParts parts{c, server->work_.get(), server->slots_.get(), server->watchdog_.get(),
                           server->streams_.get(), server->calls_.get(), server->enrollments_.get()};
  server->enrollment_ = std::make_unique<EnrollmentService>(parts);
  server->owner_ = std::make_unique<OwnerService>(parts);
  server->admin_ = std::make_unique<AdminService>(parts);
  grpc::SslServerCredentialsOptions tls(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);  // enrollment comes without one
  tls.pem_root_certs = o.ca_cert_pem;
  tls.pem_key_cert_pairs.push_back({o.server_key_pem, o.server_cert_pem});
  grpc::ServerBuilder builder;
  builder.AddListeningPort(o.listen, grpc::SslServerCredentials(tls), &server->port_);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  // Each stream may have at most this much received and not yet read: a fixed flow-control window
  // instead of one gRPC grows by bandwidth-delay probing (to tens of MiB a stream on a fast link,
  // 350 MiB with 8 uploads measured).
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, o.stream_window_mib << 20);
  // What one connection may open and send before anything is authorized: streams at once, header
  // bytes per call, and time to finish the TLS handshake.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, o.streams_per_connection);
  builder.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, 16 << 10);
  builder.AddChannelArgument(GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS, 10000);
  // The ceiling on what gRPC itself holds for all connections together (read buffers, calls).
  // Sized far above what the windows and slots let legitimate transfers use (so they never meet
  // it: gRPC resets streams and sends GOAWAY when it is reached), it bounds what a flood of calls
  // — rapid resets from peers with no certificate included — can make the server hold.
  server->quota_ = std::make_unique<grpc::ResourceQuota>("flexfed-coordinator");
  server->quota_->Resize(static_cast<size_t>(o.memory_quota_mib) << 20);
  builder.SetResourceQuota(*server->quota_);
  // Idle timeouts only: keepalive pings detect a dead peer, the stream watchdog a live one that
  // stopped sending or reading; no call has a total deadline.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, o.idle_timeout_seconds * 1000 / 2);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.RegisterService(server->enrollment_.get());
  builder.RegisterService(server->owner_.get());
  builder.RegisterService(server->admin_.get());
  server->server_ = builder.BuildAndStart();
  if (!server->server_ || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", o.listen, " (in use, or not an address here)"));
  }
  return server;
}

void CoordinatorServer::Shutdown() {
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

CoordinatorServer::~CoordinatorServer() {
  Shutdown();
  // Every call has ended: the server goes, then the work threads (each finishing what it runs),
  // then the watchdog, before the limits and slots that all of them use.
  server_.reset();
  work_.reset();
  watchdog_.reset();
}

}  // namespace flexfed
