#include "coordinator/service.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "flexfed/v1/flexfed.grpc.pb.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

using grpc::CallbackServerContext;
using grpc::ServerUnaryReactor;

// Caller's version and identity. `role` "" = any authenticated caller; "admin" = operators only.
// `pem_out` receives the caller's certificate, for streams that check it again on every message.
absl::StatusOr<PeerIdentity> Authorize(Coordinator* c, CallbackServerContext* ctx, const std::string& role,
                                       std::string* pem_out = nullptr) {
  auto it = ctx->client_metadata().find(kProtocolHeader);
  const std::string version = it == ctx->client_metadata().end() ? "" : std::string(it->second.data(), it->second.size());
  if (absl::Status s = CheckProtocolVersion(version); !s.ok()) return s;
  std::string pem;
  if (auto auth = ctx->auth_context(); auth) {
    for (const grpc::string_ref& v : auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME)) pem.assign(v.data(), v.size());
  }
  absl::StatusOr<PeerIdentity> who = c->Authenticate(pem);
  if (!who.ok()) return who.status();
  if (pem_out != nullptr) *pem_out = pem;
  if (role == "admin" && who->role != "admin") {
    return absl::PermissionDeniedError("this call is for operators (an admin certificate from `flexfedctl ca init`)");
  }
  return who;
}

// An exception that reached a handler's boundary: logged (one JSON line on stderr, bytes that are
// not UTF-8 replaced) and answered INTERNAL with a short message, never gRPC's UNIMPLEMENTED "".
absl::Status HandlerFailed(CallbackServerContext* ctx, const char* what) {
  const nlohmann::json line = {{"level", "error"}, {"event", "handler_exception"}, {"peer", ctx->peer()}, {"what", what}};
  std::fprintf(stderr, "%s\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  return absl::InternalError("the coordinator failed to handle this call (logged); retry later or tell the operator");
}

// Runs `body` for an authorized caller on the work queue and finishes the unary call with its
// status there. `body` captures by value: the handler has returned by the time it runs (the request
// and response stay valid until Finish).
template <typename Body>
ServerUnaryReactor* Unary(Coordinator* c, WorkQueue* work, CallbackServerContext* ctx, const std::string& role, Body body) {
  ServerUnaryReactor* reactor = ctx->DefaultReactor();
  work->Post([c, ctx, role, reactor, body = std::move(body)]() mutable {
    absl::Status status;
    try {
      absl::StatusOr<PeerIdentity> who = Authorize(c, ctx, role);
      status = who.ok() ? body(*who) : who.status();
    } catch (const std::exception& e) {
      status = HandlerFailed(ctx, e.what());
    } catch (...) {
      status = HandlerFailed(ctx, "an exception of unknown type");
    }
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

// Client-streaming chunk upload: each chunk is verified and stored as it arrives, on the work
// queue; the reactions only hand chunks over and start the next read. Receiving the next chunk
// overlaps with storing the last (at most kInFlight chunks per stream), so a transfer runs at about
// the slower of network and disk rather than their sum. Every chunk received and not yet stored
// holds one of the server's chunk slots, so memory stays bounded however many streams are open.
//
// Lifetime: gRPC owns the reactor from UploadChunks' return until OnDone, where it deletes itself;
// gRPC calls OnDone once Finish was called and every reaction (OnReadDone) has returned. It knows
// nothing of the work this reactor posts to the work queue or parks in ChunkSlots, so the reactor
// calls Finish only when none of that is left: the thread that, under mu_, finds no read pending
// (`read_` is kEnded) and no chunk in flight calls it, once, and touches nothing after. Each piece
// of outstanding work is recorded (`read_` = kPending, ++in_flight_) in the same critical section
// that starts it, and only that work's own end clears it, in one critical section with everything
// else it does to the reactor (slots included: ChunkSlots never runs a callback inline, so it may
// be called with mu_ held). (Before issue #34 a half-close cleared "read pending" and set "reading
// done" in two steps; a chunk stored in between started a read that outlived the call.)
class UploadReactor : public grpc::ServerReadReactor<v1::UploadChunk> {
 public:
  // `role` as Authorize's: the Admin service's uploads are for operators only.
  UploadReactor(Coordinator* c, WorkQueue* work, ChunkSlots* slots, CallbackServerContext* ctx, v1::UploadStatus* response,
                const std::string& role)
      : coordinator_(c), work_(work), slots_(slots), ctx_(ctx), response_(response) {
    work_->Post([this, role] { Start(role); });
  }

  void OnReadDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!ok) {  // the client finished sending (or went away): the read's slot goes back
      slots_->Release(caller_);
      read_ = Reading::kEnded;
      Advance(lock);
      return;
    }
    read_ = Reading::kIdle;
    if (!chunk_.session_id().empty()) session_ = chunk_.session_id();
    chunk_.set_session_id(session_);
    auto mine = std::make_shared<v1::UploadChunk>();
    mine->Swap(&chunk_);
    ++in_flight_;  // keeps the read's slot until stored
    work_->Post([this, mine] { Stored(*mine); });
    Advance(lock);
  }
  void OnDone() override { delete this; }

 private:
  static constexpr int kInFlight = 4;
  // kPending: a read is outstanding or waiting for its slot (and, at first, Start() is to run);
  // kIdle: no read, one may start; kEnded: no read will start again (the client finished, or the
  // call is failing).
  enum class Reading { kPending, kIdle, kEnded };

  // On the work queue: authorizes the caller, then asks for the first chunk.
  void Start(const std::string& role) {
    absl::StatusOr<PeerIdentity> who;
    try {
      who = Authorize(coordinator_, ctx_, role, &pem_);
    } catch (const std::exception& e) {
      who = HandlerFailed(ctx_, e.what());
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (!who.ok()) {
      error_ = who.status();
      read_ = Reading::kEnded;
      Advance(lock);
      return;
    }
    who_ = *who;
    caller_ = who_.role + "/" + who_.id;
    slots_->Acquire(caller_, [this] { ReadNext(); });  // read_ stays kPending
  }

  // On the work queue, holding a slot: asks for the next chunk, unless the call is failing.
  void ReadNext() {
    std::unique_lock<std::mutex> lock(mu_);
    if (error_.ok()) {
      lock.unlock();
      StartRead(&chunk_);  // read_ stays kPending until OnReadDone
      return;
    }
    slots_->Release(caller_);
    read_ = Reading::kEnded;
    Advance(lock);
  }

  // On the work queue: stores one chunk and gives its slot back.
  void Stored(const v1::UploadChunk& mine) {
    bool failed_already;
    {
      std::lock_guard<std::mutex> lock(mu_);
      failed_already = !error_.ok();
    }
    absl::StatusOr<v1::UploadStatus> put = failed_already ? absl::StatusOr<v1::UploadStatus>(absl::AbortedError("")) : Store(mine);
    std::unique_lock<std::mutex> lock(mu_);
    slots_->Release(caller_);
    --in_flight_;
    if (!put.ok() && error_.ok()) error_ = put.status();
    Advance(lock);
  }

  // Called with mu_ held, which it releases: starts the next read when there is room for one and
  // the call is not failing, or finishes the call once no read is pending and no chunk is in
  // flight. Finishing is the last thing done with the reactor.
  void Advance(std::unique_lock<std::mutex>& lock) {
    if (!error_.ok() && read_ == Reading::kIdle) read_ = Reading::kEnded;  // stop asking for chunks
    if (read_ == Reading::kIdle && in_flight_ < kInFlight) {
      read_ = Reading::kPending;
      slots_->Acquire(caller_, [this] { ReadNext(); });
      lock.unlock();
      return;
    }
    if (read_ != Reading::kEnded || in_flight_ > 0 || finished_) {
      lock.unlock();
      return;
    }
    finished_ = true;
    lock.unlock();
    Finish(ToGrpc(Result()));
  }

  // The call's answer, once nothing is outstanding: the first error, or what the session still lacks.
  absl::Status Result() {
    if (!error_.ok()) return error_;
    if (session_.empty()) return absl::InvalidArgumentError("no chunk was sent");
    try {
      absl::StatusOr<v1::UploadStatus> status = coordinator_->QueryMissing(who_, session_);
      if (status.ok()) *response_ = *status;
      return status.status();
    } catch (const std::exception& e) {
      return HandlerFailed(ctx_, e.what());
    }
  }

  // Every chunk is authorized again: a revocation (or a certificate replaced by re-enrollment)
  // takes effect in the middle of an open stream, not at its next call.
  absl::StatusOr<v1::UploadStatus> Store(const v1::UploadChunk& chunk) {
    try {
      absl::StatusOr<PeerIdentity> again = coordinator_->Authenticate(pem_);
      if (!again.ok()) return again.status();
      return coordinator_->PutChunk(who_, chunk);
    } catch (const std::exception& e) {
      return HandlerFailed(ctx_, e.what());
    }
  }

  Coordinator* const coordinator_;
  WorkQueue* const work_;
  ChunkSlots* const slots_;
  CallbackServerContext* const ctx_;
  v1::UploadStatus* const response_;
  // Set by Start() (under mu_) before the first read; read-only afterwards.
  PeerIdentity who_;
  std::string caller_;  // role/id: whose share of the chunk slots this stream uses
  std::string pem_;
  v1::UploadChunk chunk_;  // the read buffer gRPC fills; touched only by StartRead and OnReadDone
  std::mutex mu_;          // guards what follows
  std::string session_;
  Reading read_ = Reading::kPending;
  int in_flight_ = 0;  // chunks received and not yet stored
  bool finished_ = false;
  absl::Status error_;
};

// Server-streaming download of [offset, offset + length) in messages of 1 MiB (clients verify whole
// chunks of the manifest as the bytes add up). Each message is read on the work queue, holding a
// chunk slot until gRPC has taken it; the write reaction only gives the slot back and asks for the
// next one. gRPC keeps its own copy of a message until the socket has taken it: small messages keep
// that copy small with many downloads at once, at no cost in speed (measured, docs/PERFORMANCE.md).
constexpr uint64_t kDownloadMessageBytes = 1 << 20;

class DownloadReactor : public grpc::ServerWriteReactor<v1::DataChunk> {
 public:
  DownloadReactor(Coordinator* c, WorkQueue* work, ChunkSlots* slots, CallbackServerContext* ctx, const v1::DownloadRequest* request)
      : coordinator_(c), work_(work), slots_(slots), sha256_(request->sha256()), offset_(request->offset()) {
    const uint64_t length = request->length();
    work_->Post([this, ctx, length] {
      try {
        Start(ctx, length);
      } catch (const std::exception& e) {
        Finish(ToGrpc(HandlerFailed(ctx, e.what())));
      }
    });
  }
  void OnWriteDone(bool ok) override {
    std::string().swap(*chunk_.mutable_data());  // sent: its memory goes back with its slot
    slots_->Release(caller_);
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the client went away"));
      return;
    }
    slots_->Acquire(caller_, [this] { Next(); });
  }
  void OnDone() override { delete this; }

 private:
  void Start(CallbackServerContext* ctx, uint64_t length) {
    absl::StatusOr<PeerIdentity> who = Authorize(coordinator_, ctx, "", &pem_);
    if (!who.ok()) {
      Finish(ToGrpc(who.status()));
      return;
    }
    who_ = *who;
    caller_ = who_.role + "/" + who_.id;
    // May the caller read it? Asked first, so that the answer says nothing about other blobs.
    if (absl::StatusOr<std::string> probe = coordinator_->ReadBlob(who_, sha256_, 0, 0); !probe.ok()) {
      Finish(ToGrpc(probe.status()));
      return;
    }
    absl::StatusOr<uint64_t> size = coordinator_->blobs().Size(sha256_);
    if (!size.ok()) {
      Finish(ToGrpc(size.status()));
      return;
    }
    end_ = length == 0 ? *size : std::min(*size, offset_ + length);
    slots_->Acquire(caller_, [this] { Next(); });
  }
  // On the work queue, holding a slot: reads the next chunk and sends it, or finishes.
  void Next() {
    absl::Status failed;
    if (offset_ < end_) {
      const uint64_t n = std::min<uint64_t>(kDownloadMessageBytes, end_ - offset_);
      absl::StatusOr<std::string> data;
      try {
        absl::StatusOr<PeerIdentity> again = coordinator_->Authenticate(pem_);  // every message, as uploads
        data = again.ok() ? coordinator_->ReadBlob(who_, sha256_, offset_, n) : absl::StatusOr<std::string>(again.status());
      } catch (const std::exception& e) {
        data = absl::InternalError(std::string("reading the blob failed: ") + e.what());
      }
      if (data.ok() && !data->empty()) {
        chunk_.set_offset(offset_);
        chunk_.set_data(*std::move(data));
        offset_ += chunk_.data().size();
        StartWrite(&chunk_);
        return;
      }
      failed = data.ok() ? absl::DataLossError("blob ended early") : data.status();
    }
    slots_->Release(caller_);
    Finish(ToGrpc(failed));
  }
  Coordinator* coordinator_;
  WorkQueue* work_;
  ChunkSlots* slots_;
  PeerIdentity who_;
  std::string caller_;
  std::string pem_;
  std::string sha256_;
  uint64_t offset_, end_ = 0;
  v1::DataChunk chunk_;
};

class EnrollmentService final : public v1::Enrollment::CallbackService {
 public:
  EnrollmentService(Coordinator* c, WorkQueue* work) : c_(c), work_(work) {}
  ServerUnaryReactor* Enroll(CallbackServerContext* ctx, const v1::EnrollRequest* r, v1::EnrollResponse* out) override {
    ServerUnaryReactor* reactor = ctx->DefaultReactor();
    work_->Post([this, ctx, r, out, reactor] {
      auto it = ctx->client_metadata().find(kProtocolHeader);
      absl::Status s = CheckProtocolVersion(it == ctx->client_metadata().end() ? "" : std::string(it->second.data(), it->second.size()));
      try {
        if (s.ok()) s = Fill(c_->Enroll(*r), out);
      } catch (const std::exception& e) {
        s = HandlerFailed(ctx, e.what());
      }
      reactor->Finish(ToGrpc(s));
    });
    return reactor;
  }

 private:
  Coordinator* c_;
  WorkQueue* work_;
};

class OwnerService final : public v1::Owner::CallbackService {
 public:
  OwnerService(Coordinator* c, WorkQueue* work, ChunkSlots* slots) : c_(c), work_(work), slots_(slots) {}
  ServerUnaryReactor* GetAnchor(CallbackServerContext* ctx, const v1::GetAnchorRequest* r, v1::Anchor* out) override {
    return Unary(c_, work_, ctx, "", [=](const PeerIdentity&) { return Fill(c_->GetAnchor(r->anchor_id()), out); });
  }
  ServerUnaryReactor* GetManifest(CallbackServerContext* ctx, const v1::GetManifestRequest* r, v1::Manifest* out) override {
    return Unary(c_, work_, ctx, "", [=](const PeerIdentity& who) { return Fill(c_->GetManifest(who, r->sha256()), out); });
  }
  grpc::ServerWriteReactor<v1::DataChunk>* Download(CallbackServerContext* ctx, const v1::DownloadRequest* r) override {
    return new DownloadReactor(c_, work_, slots_, ctx, r);
  }
  ServerUnaryReactor* BeginUpload(CallbackServerContext* ctx, const v1::BeginUploadRequest* r, v1::UploadStatus* out) override {
    return Unary(c_, work_, ctx, "", [=](const PeerIdentity& who) {
      if (r->expert_id().empty()) return absl::InvalidArgumentError("name the expert the module is for");
      return Fill(c_->BeginUpload(who, r->expert_id(), r->manifest()), out);
    });
  }
  grpc::ServerReadReactor<v1::UploadChunk>* UploadChunks(CallbackServerContext* ctx, v1::UploadStatus* out) override {
    return new UploadReactor(c_, work_, slots_, ctx, out, "");
  }
  ServerUnaryReactor* QueryMissing(CallbackServerContext* ctx, const v1::QueryMissingRequest* r, v1::UploadStatus* out) override {
    return Unary(c_, work_, ctx, "", [=](const PeerIdentity& who) { return Fill(c_->QueryMissing(who, r->session_id()), out); });
  }
  ServerUnaryReactor* CommitUpload(CallbackServerContext* ctx, const v1::CommitUploadRequest* r, v1::CommitUploadResponse* out) override {
    return Unary(c_, work_, ctx, "", [=](const PeerIdentity& who) { return Fill(c_->CommitUpload(who, r->session_id()), out); });
  }
  ServerUnaryReactor* Heartbeat(CallbackServerContext* ctx, const v1::HeartbeatRequest* r, v1::HeartbeatResponse* out) override {
    return Unary(c_, work_, ctx, "", [=](const PeerIdentity& who) {
      out->set_server_unix(c_->Now());
      return c_->Heartbeat(who, *r);
    });
  }
  ServerUnaryReactor* GetExpert(CallbackServerContext* ctx, const v1::GetExpertRequest* r, v1::Expert* out) override {
    return Unary(c_, work_, ctx, "", [=](const PeerIdentity& who) { return Fill(c_->GetExpert(who, r->expert_id()), out); });
  }

 private:
  Coordinator* c_;
  WorkQueue* work_;
  ChunkSlots* slots_;
};

class AdminService final : public v1::Admin::CallbackService {
 public:
  AdminService(Coordinator* c, WorkQueue* work, ChunkSlots* slots) : c_(c), work_(work), slots_(slots) {}
  ServerUnaryReactor* PublishAnchor(CallbackServerContext* ctx, const v1::PublishAnchorRequest* r, v1::Anchor* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->PublishAnchor(who, *r), out); });
  }
  ServerUnaryReactor* ListAnchors(CallbackServerContext* ctx, const v1::ListRequest*, v1::ListAnchorsResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListAnchors(), out); });
  }
  ServerUnaryReactor* AddOwner(CallbackServerContext* ctx, const v1::AddOwnerRequest* r, v1::AddOwnerResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->AddOwner(who, *r), out); });
  }
  ServerUnaryReactor* ReenrollOwner(CallbackServerContext* ctx, const v1::AddOwnerRequest* r, v1::AddOwnerResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->ReenrollOwner(who, *r), out); });
  }
  ServerUnaryReactor* ListOwners(CallbackServerContext* ctx, const v1::ListRequest*, v1::ListOwnersResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListOwners(), out); });
  }
  ServerUnaryReactor* RevokeOwner(CallbackServerContext* ctx, const v1::RevokeOwnerRequest* r, v1::OwnerInfo* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->RevokeOwner(who, *r), out); });
  }
  ServerUnaryReactor* RegisterExpert(CallbackServerContext* ctx, const v1::RegisterExpertRequest* r, v1::Expert* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->RegisterExpert(who, *r), out); });
  }
  ServerUnaryReactor* ListExperts(CallbackServerContext* ctx, const v1::ListRequest*, v1::ListExpertsResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListExperts(), out); });
  }
  ServerUnaryReactor* BuildRelease(CallbackServerContext* ctx, const v1::BuildReleaseRequest* r, v1::Release* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->BuildRelease(who, *r), out); });
  }
  ServerUnaryReactor* GetRelease(CallbackServerContext* ctx, const v1::GetReleaseRequest* r, v1::Release* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->GetRelease(r->release_id()), out); });
  }
  ServerUnaryReactor* ListReleases(CallbackServerContext* ctx, const v1::ListRequest*, v1::ListReleasesResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListReleases(), out); });
  }
  ServerUnaryReactor* SetExpertState(CallbackServerContext* ctx, const v1::SetExpertStateRequest* r, v1::Expert* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->SetExpertState(who, *r), out); });
  }
  ServerUnaryReactor* ListUploads(CallbackServerContext* ctx, const v1::ListRequest* r, v1::ListUploadsResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->ListUploads(r->limit()), out); });
  }
  ServerUnaryReactor* TailAudit(CallbackServerContext* ctx, const v1::TailAuditRequest* r, v1::TailAuditResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->TailAudit(r->limit(), r->skip()), out); });
  }
  ServerUnaryReactor* GetStatus(CallbackServerContext* ctx, const v1::GetStatusRequest*, v1::StatusResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity&) { return Fill(c_->Status(), out); });
  }
  ServerUnaryReactor* CheckStore(CallbackServerContext* ctx, const v1::CheckStoreRequest* r, v1::CheckStoreResponse* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->CheckStore(who, *r), out); });
  }
  ServerUnaryReactor* BeginBlobUpload(CallbackServerContext* ctx, const v1::Manifest* r, v1::UploadStatus* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) { return Fill(c_->BeginUpload(who, "", *r), out); });
  }
  grpc::ServerReadReactor<v1::UploadChunk>* UploadBlobChunks(CallbackServerContext* ctx, v1::UploadStatus* out) override {
    return new UploadReactor(c_, work_, slots_, ctx, out, "admin");  // operators only; the session says whose upload it is
  }
  ServerUnaryReactor* CommitBlob(CallbackServerContext* ctx, const v1::CommitUploadRequest* r, v1::BlobRef* out) override {
    return Unary(c_, work_, ctx, "admin", [=](const PeerIdentity& who) -> absl::Status {
      absl::StatusOr<v1::CommitUploadResponse> committed = c_->CommitUpload(who, r->session_id());
      if (!committed.ok()) return committed.status();
      *out = committed->blob();
      return absl::OkStatus();
    });
  }

 private:
  Coordinator* c_;
  WorkQueue* work_;
  ChunkSlots* slots_;
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
  server->enrollment_ = std::make_unique<EnrollmentService>(c, server->work_.get());
  server->owner_ = std::make_unique<OwnerService>(c, server->work_.get(), server->slots_.get());
  server->admin_ = std::make_unique<AdminService>(c, server->work_.get(), server->slots_.get());
  grpc::SslServerCredentialsOptions tls(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);  // enrollment comes without one
  tls.pem_root_certs = o.ca_cert_pem;
  tls.pem_key_cert_pairs.push_back({o.server_key_pem, o.server_cert_pem});
  grpc::ServerBuilder builder;
  builder.AddListeningPort(o.listen, grpc::SslServerCredentials(tls), &server->port_);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  // Each stream may have at most this much received and not yet read: a fixed flow-control window
  // instead of one gRPC grows by bandwidth-delay probing (to tens of MiB a stream on a fast link,
  // 350 MiB with 8 uploads measured). A memory quota was tried instead: gRPC then resets streams
  // (RESOURCE_EXHAUSTED) when it runs out, which fails transfers rather than slowing them.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, o.stream_window_mib << 20);
  // Idle timeouts only: keepalive pings detect a dead peer; no call has a total deadline.
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

CoordinatorServer::~CoordinatorServer() { Shutdown(); }

}  // namespace flexfed
