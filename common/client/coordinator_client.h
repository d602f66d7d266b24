// Client side of the FlexFed protocol (proto/flexfed/v1/, docs/PROTOCOL.md), shared by flexfedctl
// and flexfed-owner: mTLS channels, the protocol version header, and resumable chunked transfers
// with retries (backoff with jitter on UNAVAILABLE). Not thread-safe: one client per thread.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/core/progress.h"
#include "flexfed/v1/flexfed.grpc.pb.h"

namespace flexfed {

// An identity folder: ca.crt (the pinned project CA), client.crt and client.key (0600).
struct ClientIdentity {
  std::string ca_cert_pem;
  std::string cert_pem;  // empty before enrollment
  std::string key_pem;

  static absl::StatusOr<ClientIdentity> Load(const std::string& dir);
  absl::Status Save(const std::string& dir) const;  // key written with mode 0600
};

struct RetryPolicy {
  int attempts = 8;
  double first_backoff_seconds = 0.5;
  double max_backoff_seconds = 30;
};

class CoordinatorClient {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorClient>> Connect(const std::string& address, const ClientIdentity& id);

  // A context with the protocol version header and no deadline (transfers may take hours;
  // keepalive detects a dead peer instead).
  std::unique_ptr<grpc::ClientContext> NewContext() const;
  v1::Enrollment::Stub& enrollment() { return *enrollment_; }
  v1::Owner::Stub& owner() { return *owner_; }
  v1::Admin::Stub& admin() { return *admin_; }

  // Uploads a file, resumably: declares its manifest, sends only the chunks the coordinator lacks,
  // commits. Owners upload a module for `expert_id`; operators (empty `expert_id`) a plain blob.
  // UNAVAILABLE is retried with exponential backoff and jitter, re-asking what is missing.
  absl::StatusOr<v1::CommitUploadResponse> UploadFile(const std::string& path, const std::string& expert_id,
                                                      ProgressReporter* progress, const RetryPolicy& retry = {});

  // Downloads a blob to `path`, resuming from `path.part` and checking every chunk against the
  // coordinator's manifest; `path` appears only when complete and verified.
  absl::Status DownloadBlob(const std::string& sha256, const std::string& path, ProgressReporter* progress,
                            const RetryPolicy& retry = {});

  // Downloads every file of `anchor` into `dir` (files already there with the right hash are
  // kept). Callers then check the whole directory with AnchorId() (common/model/anchor.h).
  absl::Status DownloadAnchorFiles(const v1::Anchor& anchor, const std::string& dir, ProgressReporter* progress);

 private:
  CoordinatorClient() = default;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Enrollment::Stub> enrollment_;
  std::unique_ptr<v1::Owner::Stub> owner_;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

absl::Status ToStatus(const grpc::Status& status);

}  // namespace flexfed
