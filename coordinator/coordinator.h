// The coordinator's logic, independent of the transport: enrollment, anchors, experts, resumable
// uploads with validation before anything becomes visible, and the audit trail. The gRPC layer
// (coordinator/service.h) authenticates the caller from its TLS certificate and calls in here.
// Protocol: proto/flexfed/v1/flexfed.proto, docs/PROTOCOL.md. Thread-safe.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "common/core/expert_module.h"
#include "common/core/identity.h"
#include "common/core/model_config.h"
#include "coordinator/audit_log.h"
#include "coordinator/blob_store.h"
#include "coordinator/store.h"
#include "flexfed/v1/flexfed.pb.h"

namespace flexfed {

struct CoordinatorOptions {
  std::string data_dir;     // metadata.db, blobs/, audit.jsonl
  std::string ca_key_pem;   // signs owners' CSRs at enrollment
  std::string ca_cert_pem;
  int certificate_days = 365;
  int64_t default_token_ttl_seconds = 7 * 86400;
  std::function<int64_t()> clock;  // Unix seconds; empty = the system clock (tests inject one)
  PrivacyPolicy privacy_policy;    // what every uploaded module's privacy record must show (docs/PRIVACY.md)
};

// Counters the metrics endpoint exports.
struct CoordinatorCounters {
  std::map<std::string, int64_t> rejected_uploads;  // by reason
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
  int64_t committed_uploads = 0;
  int64_t store_problems = 0;  // findings the last store check left unrepaired
  int64_t damaged_reads = 0;   // chunks refused to a reader because the stored copy no longer matched
  int64_t audit_failures = 0;  // events the audit log could not take
};

class Coordinator {
 public:
  static constexpr int64_t kMaxTokenTtlSeconds = 366 * 86400;  // the longest a one-time token lives

  static absl::StatusOr<std::unique_ptr<Coordinator>> Open(const CoordinatorOptions& options);

  // Who is calling: the identity in a verified client certificate, refused when its owner is
  // unknown or revoked, or when it is not the owner's current certificate.
  absl::StatusOr<PeerIdentity> Authenticate(const std::string& peer_certificate_pem);

  // Enrollment (no client certificate yet): one-time token + CSR → certificate.
  absl::StatusOr<v1::EnrollResponse> Enroll(const v1::EnrollRequest& request);

  // Operators (the caller is an authenticated admin).
  absl::StatusOr<v1::Anchor> PublishAnchor(const PeerIdentity& who, const v1::PublishAnchorRequest& request);
  absl::StatusOr<v1::ListAnchorsResponse> ListAnchors();
  absl::StatusOr<v1::AddOwnerResponse> AddOwner(const PeerIdentity& who, const v1::AddOwnerRequest& request);
  // A revoked owner's fresh one-time token; its old certificate stays refused.
  absl::StatusOr<v1::AddOwnerResponse> ReenrollOwner(const PeerIdentity& who, const v1::AddOwnerRequest& request);
  absl::StatusOr<v1::ListOwnersResponse> ListOwners();
  absl::StatusOr<v1::OwnerInfo> RevokeOwner(const PeerIdentity& who, const v1::RevokeOwnerRequest& request);
  absl::StatusOr<v1::Expert> RegisterExpert(const PeerIdentity& who, const v1::RegisterExpertRequest& request);
  absl::StatusOr<v1::ListExpertsResponse> ListExperts();
  absl::StatusOr<v1::Expert> SetExpertState(const PeerIdentity& who, const v1::SetExpertStateRequest& request);
  absl::StatusOr<v1::ListUploadsResponse> ListUploads(int limit);
  absl::StatusOr<v1::TailAuditResponse> TailAudit(int limit, int64_t skip = 0);
  absl::StatusOr<v1::StatusResponse> Status();
  // A new release of the current anchor's active experts (in registration order) minus those in
  // request.exclude. Existing releases never change; disabling an expert affects later ones only.
  absl::StatusOr<v1::Release> BuildRelease(const PeerIdentity& who, const v1::BuildReleaseRequest& request);
  absl::StatusOr<v1::Release> GetRelease(const std::string& release_id);  // empty: the newest
  absl::StatusOr<v1::ListReleasesResponse> ListReleases();

  // Transfers. `expert_id` empty = an operator's blob upload (anchor files; admins only).
  absl::StatusOr<v1::UploadStatus> BeginUpload(const PeerIdentity& who, const std::string& expert_id,
                                               const v1::Manifest& manifest);
  absl::StatusOr<v1::UploadStatus> PutChunk(const PeerIdentity& who, const v1::UploadChunk& chunk);
  absl::StatusOr<v1::UploadStatus> QueryMissing(const PeerIdentity& who, const std::string& session_id);
  // Owners: validates and attaches the module (idempotent). Admins: stores the blob.
  absl::StatusOr<v1::CommitUploadResponse> CommitUpload(const PeerIdentity& who, const std::string& session_id);
  absl::StatusOr<v1::Anchor> GetAnchor(const std::string& anchor_id);
  absl::StatusOr<v1::Expert> GetExpert(const PeerIdentity& who, const std::string& expert_id);
  absl::StatusOr<v1::Manifest> GetManifest(const PeerIdentity& who, const std::string& sha256);
  // Reads part of a blob the caller may read (owners: files of an anchor; admins: anything).
  absl::StatusOr<std::string> ReadBlob(const PeerIdentity& who, const std::string& sha256, uint64_t offset,
                                       uint64_t length);
  // Chunk `index` of a blob the caller may read, checked against its SHA-256 in `layout` (the blob's
  // chunk manifest): a stored copy damaged since it was written is never served — DataLoss naming
  // the coordinator's copy, counted, logged — so the reader is not left blaming its network.
  absl::StatusOr<std::string> ReadChunk(const PeerIdentity& who, const ChunkLayout& layout, uint64_t index);
  absl::Status Heartbeat(const PeerIdentity& who, const v1::HeartbeatRequest& request);

  // The store's invariants (proto CheckStoreRequest): reports what is wrong and, with
  // request.repair, removes what nothing can need. Safe while serving. Open() runs it without hashes
  // and repairing; `flexfedctl status --check` runs it on demand. Cancelled by Stop().
  absl::StatusOr<v1::CheckStoreResponse> CheckStore(const PeerIdentity& who, const v1::CheckStoreRequest& request);
  // Cancels long work in progress (store checks), ahead of a shutdown.
  void Stop() { stopping_ = true; }
  // What Open()'s check found and repaired.
  const v1::CheckStoreResponse& startup_check() const { return startup_check_; }

  CoordinatorCounters counters();
  int64_t Now() const { return options_.clock(); }
  const std::string& data_dir() const { return options_.data_dir; }
  BlobStore& blobs() { return *blobs_; }

 private:
  Coordinator() = default;
  // Appends an event to the audit log; a failure is logged, counted and returned.
  absl::Status TryAudit(const PeerIdentity& who, const std::string& action, std::map<std::string, std::string> objects,
                        const std::string& result);
  // TryAudit for the callers that go on whatever happens to the event: the change is made, and a
  // failure is on stderr and in the metrics (flexfed_audit_failures_total).
  void Audit(const PeerIdentity& who, const std::string& action, std::map<std::string, std::string> objects,
             const std::string& result) {
    TryAudit(who, action, std::move(objects), result).IgnoreError();
  }
  // Per upload session: chunk writes hold it shared, commit (and the store check) exclusive, so no
  // chunk lands in (and re-creates) a session folder that a commit has assembled and dropped. Locks
  // are striped by the session id's hash: a fixed set, however many sessions come and go.
  std::shared_mutex& SessionLock(const std::string& session_id);
  // Per expert: BeginUpload holds it from reading the expert's open uploads to recording its own,
  // so two pushes racing for one expert leave one open upload, not both (striped like sessions).
  // Taken before any session lock, never the other way round.
  std::mutex& ExpertLock(const std::string& expert_id);
  // When a one-time enrollment token asked for now with this lifetime (0: the default) expires;
  // InvalidArgument for a lifetime above kMaxTokenTtlSeconds.
  absl::StatusOr<int64_t> TokenExpiry(int64_t requested_ttl_seconds) const;
  absl::StatusOr<v1::CommitUploadResponse> CommitModule(const PeerIdentity& who, UploadRecord upload);
  // A refused module's blob goes, unless something else refers to the same bytes. Called with
  // blob_gc_mu_ held shared (by the commit).
  void DropIfUnreferenced(const std::string& sha256);
  // An anchor's config.json, read from its blob and parsed: the one way the coordinator reads it
  // (publishing checks a new anchor's; uploads are sized and modules validated against an expert's).
  absl::StatusOr<ModelConfig> ConfigFromBlob(const v1::BlobRef& blob);
  absl::StatusOr<ModelConfig> AnchorConfig(const std::string& anchor_id);

  CoordinatorOptions options_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<BlobStore> blobs_;
  std::unique_ptr<AuditLog> audit_;
  std::mutex mu_;  // guards counters_
  std::mutex release_mu_;  // serialises BuildRelease (release numbering)
  std::mutex check_mu_;    // one store check at a time
  // Commits hold it shared from assembling a blob to recording it; the store check holds it
  // exclusive while it re-checks and removes an unreferenced blob, so it never removes a blob a
  // commit has just found in place and is about to attach.
  std::shared_mutex blob_gc_mu_;
  CoordinatorCounters counters_;
  std::array<std::shared_mutex, 512> session_locks_;
  std::array<std::mutex, 64> expert_locks_;
  v1::CheckStoreResponse startup_check_;
  std::atomic<bool> stopping_{false};
  int64_t started_unix_ = 0;
};

v1::Expert ToProto(const ExpertRecord& e);

}  // namespace flexfed
