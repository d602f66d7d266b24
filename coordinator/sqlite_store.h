// Store on SQLite in WAL mode, with versioned schema migrations applied at open.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "coordinator/store.h"

struct sqlite3;

namespace flexfed {

class SqliteStore final : public Store {
 public:
  // Opens (creating) the database and migrates it to the newest schema. Refuses a database
  // written by a newer FlexFed (its schema is unknown here).
  static absl::StatusOr<std::unique_ptr<SqliteStore>> Open(const std::string& path);
  ~SqliteStore() override;

  int schema_version() override;
  absl::Status CheckIntegrity() override;
  absl::Status AddAnchor(const AnchorRecord& anchor, bool make_current) override;
  absl::StatusOr<AnchorRecord> GetAnchor(const std::string& anchor_id) override;
  absl::StatusOr<std::vector<AnchorRecord>> ListAnchors() override;
  absl::Status AddOwner(const OwnerRecord& owner) override;
  absl::StatusOr<OwnerRecord> GetOwner(const std::string& owner_id) override;
  absl::StatusOr<std::vector<OwnerRecord>> ListOwners() override;
  absl::Status UpdateOwner(const OwnerRecord& owner) override;
  absl::Status ConsumeEnrollmentToken(const std::string& owner_id, const std::string& token_sha256,
                                      const std::string& certificate_sha256, int64_t certificate_expires_unix) override;
  absl::Status AddExpert(const ExpertRecord& expert) override;
  absl::StatusOr<ExpertRecord> GetExpert(const std::string& expert_id) override;
  absl::StatusOr<std::vector<ExpertRecord>> ListExperts() override;
  absl::Status UpdateExpert(const ExpertRecord& expert) override;
  absl::Status RevokeOwner(const std::string& owner_id, const std::string& reason) override;
  absl::Status TouchOwner(const std::string& owner_id, int64_t now_unix) override;
  absl::Status ReissueEnrollmentToken(const std::string& owner_id, const std::string& token_sha256,
                                      int64_t token_expires_unix) override;
  absl::Status SetExpertState(const std::string& expert_id, const std::string& from, const std::string& to,
                              int64_t now_unix) override;
  absl::Status AddUpload(const UploadRecord& upload) override;
  absl::StatusOr<UploadRecord> GetUpload(const std::string& session_id) override;
  absl::StatusOr<std::vector<UploadRecord>> ListUploads(int limit) override;
  absl::StatusOr<std::vector<UploadRecord>> OpenUploadsOf(const std::string& expert_id) override;
  absl::Status UpdateUpload(const UploadRecord& upload) override;
  absl::Status CommitModule(const UploadRecord& upload, const ExpertRecord& expert) override;
  absl::Status AddRelease(const ReleaseRecord& release) override;
  absl::StatusOr<ReleaseRecord> GetRelease(const std::string& release_id) override;
  absl::StatusOr<std::vector<ReleaseRecord>> ListReleases() override;
  absl::StatusOr<bool> IsBlobReferenced(const std::string& sha256) override;

  static constexpr int kSchemaVersion = 4;

 private:
  explicit SqliteStore(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  absl::Status Exec(const std::string& sql);
  absl::Status Migrate();
  std::mutex mu_;  // one connection, serialised
  sqlite3* db_;
  std::string path_;
};

}  // namespace flexfed
