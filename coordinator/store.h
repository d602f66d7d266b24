// The coordinator's metadata: anchors, owners, experts, upload sessions and releases (docs/ARCHITECTURE.md §6).
// An interface so PostgreSQL can serve larger deployments; SqliteStore (sqlite_store.h) is the
// default. Implementations are thread-safe; each call is one transaction.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

struct AnchorRecord {
  std::string anchor_id;
  std::string files_json;  // [{"name", "sha256", "size"}], the manifest
  std::string config_hash;
  int64_t published_unix = 0;
  std::string note;
  bool current = false;
};

struct OwnerRecord {
  std::string owner_id;
  std::string display_name;
  int64_t created_unix = 0;
  std::string token_sha256;  // of the one-time enrollment token; empty once used
  int64_t token_expires_unix = 0;
  std::string certificate_sha256;  // fingerprint of the issued certificate
  int64_t certificate_expires_unix = 0;
  bool revoked = false;
  std::string revoked_reason;
  int64_t last_seen_unix = 0;
};

// Expert states: registered → uploaded → active ⇄ disabled; any → retired (final).
struct ExpertRecord {
  std::string expert_id;  // "<owner>/<name>"
  std::string owner_id;
  std::string name;
  std::string domain;
  std::string anchor_id;
  std::string state = "registered";
  std::string module_sha256;
  int64_t module_size = 0;
  int64_t tokens_trained = 0;
  int64_t created_unix = 0;
  int64_t updated_unix = 0;
};

struct UploadRecord {
  std::string session_id;
  std::string expert_id;  // empty for operator blob uploads (anchor files)
  std::string owner_id;   // who opened it ("admin" for operators)
  std::string manifest_json;
  std::string blob_sha256;
  int64_t blob_size = 0;
  std::string state = "open";  // open | committed | rejected
  std::string rejection;       // reason code when rejected
  std::string message;
  int64_t started_unix = 0;
  int64_t updated_unix = 0;
  std::string policy;  // for a privacy_policy rejection: PolicyFingerprint of the policy then in force
};

// A release: which experts, in which router order, on which anchor (docs/ARCHITECTURE.md §7). Written
// once, never changed (the database refuses updates and deletes).
struct ReleaseRecord {
  std::string release_id;
  std::string anchor_id;
  std::string manifest_json;  // common/core/release.h
  std::string manifest_sha256;
  int64_t created_unix = 0;
};

class Store {
 public:
  virtual ~Store() = default;

  virtual int schema_version() = 0;
  // The database's own consistency check (for SQLite, PRAGMA quick_check): DataLoss naming the
  // first problems when it fails.
  virtual absl::Status CheckIntegrity() = 0;

  // Adds an anchor; with `make_current`, it becomes the one owners train against.
  virtual absl::Status AddAnchor(const AnchorRecord& anchor, bool make_current) = 0;
  // The anchor `anchor_id`, or the current one when empty. NotFound if none.
  virtual absl::StatusOr<AnchorRecord> GetAnchor(const std::string& anchor_id) = 0;
  virtual absl::StatusOr<std::vector<AnchorRecord>> ListAnchors() = 0;

  virtual absl::Status AddOwner(const OwnerRecord& owner) = 0;  // AlreadyExists if the id is taken
  virtual absl::StatusOr<OwnerRecord> GetOwner(const std::string& owner_id) = 0;
  virtual absl::StatusOr<std::vector<OwnerRecord>> ListOwners() = 0;
  virtual absl::Status UpdateOwner(const OwnerRecord& owner) = 0;
  // Enrollment as one conditional update: consumes the token whose hash is `token_sha256` and
  // records the certificate, only while that token is still the owner's and the owner is not
  // revoked; FailedPrecondition otherwise (a concurrent enrollment used it first).
  virtual absl::Status ConsumeEnrollmentToken(const std::string& owner_id, const std::string& token_sha256,
                                              const std::string& certificate_sha256, int64_t certificate_expires_unix) = 0;

  virtual absl::Status AddExpert(const ExpertRecord& expert) = 0;  // AlreadyExists if the id is taken
  virtual absl::StatusOr<ExpertRecord> GetExpert(const std::string& expert_id) = 0;
  virtual absl::StatusOr<std::vector<ExpertRecord>> ListExperts() = 0;
  virtual absl::Status UpdateExpert(const ExpertRecord& expert) = 0;

  // Field-wise, conditional updates: each changes only its fields, so concurrent changes to other
  // fields are never lost (a heartbeat cannot un-revoke, a commit cannot undo a disable).
  virtual absl::Status RevokeOwner(const std::string& owner_id, const std::string& reason) = 0;
  virtual absl::Status TouchOwner(const std::string& owner_id, int64_t now_unix) = 0;
  // A revoked owner gets a new token (its certificate is forgotten, so the old one stays refused);
  // FailedPrecondition unless the owner is revoked.
  virtual absl::Status ReissueEnrollmentToken(const std::string& owner_id, const std::string& token_sha256,
                                              int64_t token_expires_unix) = 0;
  // `from` -> `to`, only if the expert is still in `from`: FailedPrecondition otherwise.
  virtual absl::Status SetExpertState(const std::string& expert_id, const std::string& from, const std::string& to,
                                      int64_t now_unix) = 0;

  virtual absl::Status AddUpload(const UploadRecord& upload) = 0;
  virtual absl::StatusOr<UploadRecord> GetUpload(const std::string& session_id) = 0;
  virtual absl::StatusOr<std::vector<UploadRecord>> ListUploads(int limit) = 0;
  // The open uploads of one expert (at most one once BeginUpload supersedes older ones).
  virtual absl::StatusOr<std::vector<UploadRecord>> OpenUploadsOf(const std::string& expert_id) = 0;
  virtual absl::Status UpdateUpload(const UploadRecord& upload) = 0;
  // Marks the upload committed and attaches its blob to the expert, in one transaction: a crash
  // leaves both as they were or both updated, never an expert pointing at an uncommitted module.
  // In one transaction: the upload's row, and the expert's module fields (module_sha256,
  // module_size, tokens_trained, updated_unix; registered -> uploaded) — unless the expert was
  // retired meanwhile (FailedPrecondition, nothing written). The expert's state is otherwise kept.
  virtual absl::Status CommitModule(const UploadRecord& upload, const ExpertRecord& expert) = 0;

  virtual absl::Status AddRelease(const ReleaseRecord& release) = 0;  // AlreadyExists if the id is taken
  virtual absl::StatusOr<ReleaseRecord> GetRelease(const std::string& release_id) = 0;
  virtual absl::StatusOr<std::vector<ReleaseRecord>> ListReleases() = 0;  // oldest first

  // Whether any anchor, expert, release or open upload refers to the blob (for garbage collection).
  virtual absl::StatusOr<bool> IsBlobReferenced(const std::string& sha256) = 0;
};

}  // namespace flexfed
