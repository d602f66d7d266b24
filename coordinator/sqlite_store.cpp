#include "coordinator/sqlite_store.h"

#include <sqlite3.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace flexfed {
namespace {

// Schema migrations, applied in order; migration i takes the database from version i to i + 1.
// Never edit a released migration: add the next one.
const char* const kMigrations[] = {
    // 0 → 1
    R"sql(
    CREATE TABLE anchors (
      anchor_id TEXT PRIMARY KEY,
      files_json TEXT NOT NULL,
      config_hash TEXT NOT NULL,
      published_unix INTEGER NOT NULL,
      note TEXT NOT NULL DEFAULT '',
      current INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE owners (
      owner_id TEXT PRIMARY KEY,
      display_name TEXT NOT NULL,
      created_unix INTEGER NOT NULL,
      token_sha256 TEXT NOT NULL DEFAULT '',
      token_expires_unix INTEGER NOT NULL DEFAULT 0,
      certificate_sha256 TEXT NOT NULL DEFAULT '',
      certificate_expires_unix INTEGER NOT NULL DEFAULT 0,
      revoked INTEGER NOT NULL DEFAULT 0,
      revoked_reason TEXT NOT NULL DEFAULT '',
      last_seen_unix INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE experts (
      expert_id TEXT PRIMARY KEY,
      owner_id TEXT NOT NULL REFERENCES owners(owner_id),
      name TEXT NOT NULL,
      domain TEXT NOT NULL DEFAULT '',
      anchor_id TEXT NOT NULL REFERENCES anchors(anchor_id),
      state TEXT NOT NULL,
      module_sha256 TEXT NOT NULL DEFAULT '',
      module_size INTEGER NOT NULL DEFAULT 0,
      tokens_trained INTEGER NOT NULL DEFAULT 0,
      created_unix INTEGER NOT NULL,
      updated_unix INTEGER NOT NULL
    );
    CREATE TABLE uploads (
      session_id TEXT PRIMARY KEY,
      expert_id TEXT NOT NULL DEFAULT '',
      owner_id TEXT NOT NULL,
      manifest_json TEXT NOT NULL,
      blob_sha256 TEXT NOT NULL,
      blob_size INTEGER NOT NULL,
      state TEXT NOT NULL,
      rejection TEXT NOT NULL DEFAULT '',
      message TEXT NOT NULL DEFAULT '',
      started_unix INTEGER NOT NULL,
      updated_unix INTEGER NOT NULL
    );
    CREATE INDEX uploads_by_blob ON uploads(blob_sha256);
    CREATE INDEX experts_by_module ON experts(module_sha256);
    )sql",
    // 1 → 2: releases (immutable once written)
    R"sql(
    CREATE TABLE releases (
      release_id TEXT PRIMARY KEY,
      anchor_id TEXT NOT NULL REFERENCES anchors(anchor_id),
      manifest_json TEXT NOT NULL,
      manifest_sha256 TEXT NOT NULL,
      created_unix INTEGER NOT NULL
    );
    CREATE TRIGGER releases_are_immutable BEFORE UPDATE ON releases
      BEGIN SELECT RAISE(ABORT, 'releases are immutable'); END;
    CREATE TRIGGER releases_are_kept BEFORE DELETE ON releases
      BEGIN SELECT RAISE(ABORT, 'releases are immutable'); END;
    )sql",
    // 2 → 3: one open upload per expert, kept by the database (older coordinators could leave
    // several after concurrent BeginUploads; the most recently updated stays open).
    R"sql(
    UPDATE uploads SET state = 'rejected', rejection = 'superseded',
        message = 'another upload of this expert was open; a newer one is kept'
      WHERE state = 'open' AND expert_id != '' AND session_id != (
        SELECT u.session_id FROM uploads u WHERE u.state = 'open' AND u.expert_id = uploads.expert_id
          ORDER BY u.updated_unix DESC, u.session_id LIMIT 1);
    CREATE UNIQUE INDEX one_open_upload_per_expert ON uploads(expert_id) WHERE state = 'open' AND expert_id != '';
    )sql",
    // 3 → 4: the operator's privacy policy a module was refused under, so that a push after the
    // policy changed is checked again ('' for rejections older than this: checked again once).
    R"sql(
    ALTER TABLE uploads ADD COLUMN policy TEXT NOT NULL DEFAULT '';
    )sql",
};

static_assert(sizeof(kMigrations) / sizeof(kMigrations[0]) == SqliteStore::kSchemaVersion,
              "one migration per schema version");

// A prepared statement, finalised on scope exit.
class Statement {
 public:
  Statement(sqlite3* db, const char* sql) : db_(db) { rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr); }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  bool ok() const { return rc_ == SQLITE_OK; }
  Statement& Bind(const std::string& v) {
    sqlite3_bind_text(stmt_, ++index_, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Statement& Bind(int64_t v) {
    sqlite3_bind_int64(stmt_, ++index_, v);
    return *this;
  }
  Statement& Bind(bool v) { return Bind(static_cast<int64_t>(v)); }
  // SQLITE_ROW, SQLITE_DONE or an error code.
  int Step() { return rc_ = sqlite3_step(stmt_); }
  std::string Text(int col) const {
    const unsigned char* t = sqlite3_column_text(stmt_, col);
    return t ? std::string(reinterpret_cast<const char*>(t), static_cast<size_t>(sqlite3_column_bytes(stmt_, col))) : "";
  }
  int64_t Int(int col) const { return sqlite3_column_int64(stmt_, col); }
  absl::Status Error(const std::string& what) const {
    const int code = sqlite3_extended_errcode(db_);
    std::string msg = absl::StrCat(what, ": ", sqlite3_errmsg(db_));
    if (code == SQLITE_CONSTRAINT_PRIMARYKEY || code == SQLITE_CONSTRAINT_UNIQUE) return absl::AlreadyExistsError(msg);
    if ((code & 0xff) == SQLITE_CONSTRAINT) return absl::FailedPreconditionError(msg);
    if ((code & 0xff) == SQLITE_BUSY || (code & 0xff) == SQLITE_LOCKED) return absl::UnavailableError(msg);
    if ((code & 0xff) == SQLITE_FULL) return absl::ResourceExhaustedError(absl::StrCat(msg, " (free some disk space)"));
    return absl::InternalError(msg);
  }
  // Runs a statement that returns no rows.
  absl::Status Run(const std::string& what) { return Step() == SQLITE_DONE ? absl::OkStatus() : Error(what); }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
  int index_ = 0;
};

constexpr char kAnchorColumns[] = "anchor_id, files_json, config_hash, published_unix, note, current";
AnchorRecord ReadAnchor(const Statement& s) {
  return {s.Text(0), s.Text(1), s.Text(2), s.Int(3), s.Text(4), s.Int(5) != 0};
}

constexpr char kOwnerColumns[] =
    "owner_id, display_name, created_unix, token_sha256, token_expires_unix, certificate_sha256, "
    "certificate_expires_unix, revoked, revoked_reason, last_seen_unix";
OwnerRecord ReadOwner(const Statement& s) {
  return {s.Text(0), s.Text(1), s.Int(2), s.Text(3), s.Int(4), s.Text(5), s.Int(6), s.Int(7) != 0, s.Text(8), s.Int(9)};
}
void BindOwner(Statement& s, const OwnerRecord& o) {
  s.Bind(o.owner_id).Bind(o.display_name).Bind(o.created_unix).Bind(o.token_sha256).Bind(o.token_expires_unix)
      .Bind(o.certificate_sha256).Bind(o.certificate_expires_unix).Bind(o.revoked).Bind(o.revoked_reason)
      .Bind(o.last_seen_unix);
}

constexpr char kExpertColumns[] =
    "expert_id, owner_id, name, domain, anchor_id, state, module_sha256, module_size, tokens_trained, created_unix, "
    "updated_unix";
ExpertRecord ReadExpert(const Statement& s) {
  return {s.Text(0), s.Text(1), s.Text(2), s.Text(3), s.Text(4), s.Text(5), s.Text(6), s.Int(7), s.Int(8), s.Int(9), s.Int(10)};
}
void BindExpert(Statement& s, const ExpertRecord& e) {
  s.Bind(e.expert_id).Bind(e.owner_id).Bind(e.name).Bind(e.domain).Bind(e.anchor_id).Bind(e.state)
      .Bind(e.module_sha256).Bind(e.module_size).Bind(e.tokens_trained).Bind(e.created_unix).Bind(e.updated_unix);
}

constexpr char kUploadColumns[] =
    "session_id, expert_id, owner_id, manifest_json, blob_sha256, blob_size, state, rejection, message, started_unix, "
    "updated_unix, policy";
UploadRecord ReadUpload(const Statement& s) {
  return {s.Text(0), s.Text(1), s.Text(2), s.Text(3), s.Text(4), s.Int(5), s.Text(6), s.Text(7), s.Text(8), s.Int(9), s.Int(10), s.Text(11)};
}
void BindUpload(Statement& s, const UploadRecord& u) {
  s.Bind(u.session_id).Bind(u.expert_id).Bind(u.owner_id).Bind(u.manifest_json).Bind(u.blob_sha256).Bind(u.blob_size)
      .Bind(u.state).Bind(u.rejection).Bind(u.message).Bind(u.started_unix).Bind(u.updated_unix).Bind(u.policy);
}

constexpr char kReleaseColumns[] = "release_id, anchor_id, manifest_json, manifest_sha256, created_unix";
ReleaseRecord ReadRelease(const Statement& s) { return {s.Text(0), s.Text(1), s.Text(2), s.Text(3), s.Int(4)}; }

template <typename Record, typename Reader>
absl::StatusOr<std::vector<Record>> Query(sqlite3* db, const std::string& sql, Reader read, const std::vector<std::string>& binds = {}) {
  Statement s(db, sql.c_str());
  if (!s.ok()) return s.Error(sql);
  for (const std::string& b : binds) s.Bind(b);
  std::vector<Record> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back(read(s));
  if (rc != SQLITE_DONE) return s.Error(sql);
  return out;
}

template <typename Record, typename Reader>
absl::StatusOr<Record> QueryOne(sqlite3* db, const std::string& sql, const std::string& key, Reader read,
                                const std::string& what) {
  Statement s(db, sql.c_str());
  if (!s.ok()) return s.Error(sql);
  s.Bind(key);
  const int rc = s.Step();
  if (rc == SQLITE_ROW) return read(s);
  if (rc == SQLITE_DONE) return absl::NotFoundError(absl::StrCat("no ", what, " '", key, "'"));
  return s.Error(sql);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::Open(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr) !=
      SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::InternalError(absl::StrCat(path, ": cannot open the database: ", msg));
  }
  std::unique_ptr<SqliteStore> store(new SqliteStore(db, path));
  sqlite3_busy_timeout(db, 5000);
  for (const char* pragma : {"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON"}) {
    if (absl::Status s = store->Exec(pragma); !s.ok()) return s;
  }
  if (absl::Status s = store->Migrate(); !s.ok()) return s;
  return store;
}

SqliteStore::~SqliteStore() { sqlite3_close(db_); }

absl::Status SqliteStore::Exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return absl::InternalError(absl::StrCat(path_, ": ", msg));
  }
  return absl::OkStatus();
}

int SqliteStore::schema_version() {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "PRAGMA user_version");
  return s.Step() == SQLITE_ROW ? static_cast<int>(s.Int(0)) : -1;
}

absl::Status SqliteStore::CheckIntegrity() {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "PRAGMA quick_check(5)");
  std::string problems;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    const std::string line = s.Text(0);
    if (line != "ok") problems += (problems.empty() ? "" : "; ") + line;
  }
  if (rc != SQLITE_DONE) return s.Error("checking the database");
  if (!problems.empty()) return absl::DataLossError(absl::StrCat(path_, ": ", problems));
  return absl::OkStatus();
}

absl::Status SqliteStore::Migrate() {
  int version;
  {
    Statement s(db_, "PRAGMA user_version");
    if (s.Step() != SQLITE_ROW) return s.Error("reading the schema version");
    version = static_cast<int>(s.Int(0));
  }
  if (version > kSchemaVersion) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": schema version ", version, " is newer than this build's ",
                                                      kSchemaVersion, "; run a newer flexfed-coordinator"));
  }
  for (int v = version; v < kSchemaVersion; ++v) {
    // Each migration and its version bump commit together.
    if (absl::Status s = Exec(absl::StrCat("BEGIN IMMEDIATE; ", kMigrations[v], "; PRAGMA user_version = ", v + 1, "; COMMIT;"));
        !s.ok()) {
      Exec("ROLLBACK").IgnoreError();
      return absl::InternalError(absl::StrCat("migrating the schema to version ", v + 1, " failed: ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status SqliteStore::AddAnchor(const AnchorRecord& a, bool make_current) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  absl::Status result = [&]() -> absl::Status {
    if (make_current) {
      Statement clear(db_, "UPDATE anchors SET current = 0");
      if (absl::Status s = clear.Run("clearing the current anchor"); !s.ok()) return s;
    }
    Statement s(db_, absl::StrCat("INSERT INTO anchors (", kAnchorColumns, ") VALUES (?, ?, ?, ?, ?, ?)").c_str());
    s.Bind(a.anchor_id).Bind(a.files_json).Bind(a.config_hash).Bind(a.published_unix).Bind(a.note).Bind(make_current);
    return s.Run(absl::StrCat("adding anchor ", a.anchor_id));
  }();
  if (!result.ok()) {
    Exec("ROLLBACK").IgnoreError();
    return result;
  }
  return Exec("COMMIT");
}

absl::StatusOr<AnchorRecord> SqliteStore::GetAnchor(const std::string& anchor_id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (anchor_id.empty()) {
    absl::StatusOr<std::vector<AnchorRecord>> current =
        Query<AnchorRecord>(db_, absl::StrCat("SELECT ", kAnchorColumns, " FROM anchors WHERE current = 1"), ReadAnchor);
    if (!current.ok()) return current.status();
    if (current->empty()) return absl::NotFoundError("no anchor has been published yet; an operator runs `flexfedctl anchor publish`");
    return current->front();
  }
  return QueryOne<AnchorRecord>(db_, absl::StrCat("SELECT ", kAnchorColumns, " FROM anchors WHERE anchor_id = ?"),
                                anchor_id, ReadAnchor, "anchor");
}

absl::StatusOr<std::vector<AnchorRecord>> SqliteStore::ListAnchors() {
  std::lock_guard<std::mutex> lock(mu_);
  return Query<AnchorRecord>(db_, absl::StrCat("SELECT ", kAnchorColumns, " FROM anchors ORDER BY published_unix, anchor_id"),
                             ReadAnchor);
}

absl::Status SqliteStore::AddOwner(const OwnerRecord& o) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat("INSERT INTO owners (", kOwnerColumns, ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)").c_str());
  BindOwner(s, o);
  return s.Run(absl::StrCat("adding owner '", o.owner_id, "'"));
}

absl::StatusOr<OwnerRecord> SqliteStore::GetOwner(const std::string& owner_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return QueryOne<OwnerRecord>(db_, absl::StrCat("SELECT ", kOwnerColumns, " FROM owners WHERE owner_id = ?"), owner_id,
                               ReadOwner, "owner");
}

absl::StatusOr<std::vector<OwnerRecord>> SqliteStore::ListOwners() {
  std::lock_guard<std::mutex> lock(mu_);
  return Query<OwnerRecord>(db_, absl::StrCat("SELECT ", kOwnerColumns, " FROM owners ORDER BY owner_id"), ReadOwner);
}

absl::Status SqliteStore::UpdateOwner(const OwnerRecord& o) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_,
              "UPDATE owners SET owner_id = ?, display_name = ?, created_unix = ?, token_sha256 = ?, "
              "token_expires_unix = ?, certificate_sha256 = ?, certificate_expires_unix = ?, revoked = ?, "
              "revoked_reason = ?, last_seen_unix = ? WHERE owner_id = ?");
  BindOwner(s, o);
  s.Bind(o.owner_id);
  if (absl::Status st = s.Run(absl::StrCat("updating owner '", o.owner_id, "'")); !st.ok()) return st;
  if (sqlite3_changes(db_) == 0) return absl::NotFoundError(absl::StrCat("no owner '", o.owner_id, "'"));
  return absl::OkStatus();
}

absl::Status SqliteStore::RevokeOwner(const std::string& owner_id, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "UPDATE owners SET revoked = 1, revoked_reason = ?, token_sha256 = '' WHERE owner_id = ?");
  s.Bind(reason).Bind(owner_id);
  if (absl::Status st = s.Run(absl::StrCat("revoking owner '", owner_id, "'")); !st.ok()) return st;
  if (sqlite3_changes(db_) == 0) return absl::NotFoundError(absl::StrCat("no owner '", owner_id, "'"));
  return absl::OkStatus();
}

absl::Status SqliteStore::TouchOwner(const std::string& owner_id, int64_t now_unix) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "UPDATE owners SET last_seen_unix = ? WHERE owner_id = ?");
  s.Bind(now_unix).Bind(owner_id);
  return s.Run(absl::StrCat("recording owner '", owner_id, "' as seen"));
}

absl::Status SqliteStore::ReissueEnrollmentToken(const std::string& owner_id, const std::string& token_sha256,
                                                 int64_t token_expires_unix) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_,
              "UPDATE owners SET token_sha256 = ?, token_expires_unix = ?, revoked = 0, revoked_reason = '', "
              "certificate_sha256 = '', certificate_expires_unix = 0 WHERE owner_id = ? AND revoked = 1");
  s.Bind(token_sha256).Bind(token_expires_unix).Bind(owner_id);
  if (absl::Status st = s.Run(absl::StrCat("re-enrolling owner '", owner_id, "'")); !st.ok()) return st;
  if (sqlite3_changes(db_) == 0) {
    return absl::FailedPreconditionError(absl::StrCat("owner '", owner_id, "' is not revoked (or does not exist); revoke it first"));
  }
  return absl::OkStatus();
}

absl::Status SqliteStore::SetExpertState(const std::string& expert_id, const std::string& from, const std::string& to,
                                         int64_t now_unix) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "UPDATE experts SET state = ?, updated_unix = ? WHERE expert_id = ? AND state = ?");
  s.Bind(to).Bind(now_unix).Bind(expert_id).Bind(from);
  if (absl::Status st = s.Run(absl::StrCat("setting expert '", expert_id, "' ", to)); !st.ok()) return st;
  if (sqlite3_changes(db_) == 0) {
    return absl::FailedPreconditionError(absl::StrCat("expert '", expert_id, "' is no longer ", from));
  }
  return absl::OkStatus();
}

absl::Status SqliteStore::ConsumeEnrollmentToken(const std::string& owner_id, const std::string& token_sha256,
                                                 const std::string& certificate_sha256, int64_t certificate_expires_unix) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_,
              "UPDATE owners SET token_sha256 = '', certificate_sha256 = ?, certificate_expires_unix = ? "
              "WHERE owner_id = ? AND token_sha256 = ? AND token_sha256 != '' AND revoked = 0");
  s.Bind(certificate_sha256).Bind(certificate_expires_unix).Bind(owner_id).Bind(token_sha256);
  if (absl::Status st = s.Run(absl::StrCat("enrolling owner '", owner_id, "'")); !st.ok()) return st;
  if (sqlite3_changes(db_) == 0) {
    return absl::FailedPreconditionError("the token was already used; ask the operator for a new one");
  }
  return absl::OkStatus();
}

absl::Status SqliteStore::AddExpert(const ExpertRecord& e) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat("INSERT INTO experts (", kExpertColumns, ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)").c_str());
  BindExpert(s, e);
  return s.Run(absl::StrCat("registering expert '", e.expert_id, "'"));
}

absl::StatusOr<ExpertRecord> SqliteStore::GetExpert(const std::string& expert_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return QueryOne<ExpertRecord>(db_, absl::StrCat("SELECT ", kExpertColumns, " FROM experts WHERE expert_id = ?"),
                                expert_id, ReadExpert, "expert");
}

absl::StatusOr<std::vector<ExpertRecord>> SqliteStore::ListExperts() {
  std::lock_guard<std::mutex> lock(mu_);
  return Query<ExpertRecord>(db_, absl::StrCat("SELECT ", kExpertColumns, " FROM experts ORDER BY created_unix, expert_id"),
                             ReadExpert);
}

static const char kUpdateExpertSql[] =
    "UPDATE experts SET expert_id = ?, owner_id = ?, name = ?, domain = ?, anchor_id = ?, state = ?, "
    "module_sha256 = ?, module_size = ?, tokens_trained = ?, created_unix = ?, updated_unix = ? WHERE expert_id = ?";

absl::Status SqliteStore::UpdateExpert(const ExpertRecord& e) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, kUpdateExpertSql);
  BindExpert(s, e);
  s.Bind(e.expert_id);
  if (absl::Status st = s.Run(absl::StrCat("updating expert '", e.expert_id, "'")); !st.ok()) return st;
  if (sqlite3_changes(db_) == 0) return absl::NotFoundError(absl::StrCat("no expert '", e.expert_id, "'"));
  return absl::OkStatus();
}

absl::Status SqliteStore::AddUpload(const UploadRecord& u) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat("INSERT INTO uploads (", kUploadColumns, ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)").c_str());
  BindUpload(s, u);
  return s.Run(absl::StrCat("recording upload ", u.session_id));
}

absl::StatusOr<UploadRecord> SqliteStore::GetUpload(const std::string& session_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return QueryOne<UploadRecord>(db_, absl::StrCat("SELECT ", kUploadColumns, " FROM uploads WHERE session_id = ?"),
                                session_id, ReadUpload, "upload session");
}

absl::StatusOr<std::vector<UploadRecord>> SqliteStore::ListUploads(int limit) {
  std::lock_guard<std::mutex> lock(mu_);
  return Query<UploadRecord>(db_, absl::StrCat("SELECT ", kUploadColumns, " FROM uploads ORDER BY started_unix DESC, session_id LIMIT ",
                                               limit > 0 ? limit : 1000),
                             ReadUpload);
}

absl::StatusOr<std::vector<UploadRecord>> SqliteStore::OpenUploadsOf(const std::string& expert_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return Query<UploadRecord>(db_, absl::StrCat("SELECT ", kUploadColumns, " FROM uploads WHERE expert_id = ? AND state = 'open'"),
                             ReadUpload, {expert_id});
}

static const char kUpdateUploadSql[] =
    "UPDATE uploads SET session_id = ?, expert_id = ?, owner_id = ?, manifest_json = ?, blob_sha256 = ?, blob_size = ?, "
    "state = ?, rejection = ?, message = ?, started_unix = ?, updated_unix = ?, policy = ? WHERE session_id = ?";

absl::Status SqliteStore::UpdateUpload(const UploadRecord& u) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, kUpdateUploadSql);
  BindUpload(s, u);
  s.Bind(u.session_id);
  if (absl::Status st = s.Run(absl::StrCat("updating upload ", u.session_id)); !st.ok()) return st;
  if (sqlite3_changes(db_) == 0) return absl::NotFoundError(absl::StrCat("no upload session ", u.session_id));
  return absl::OkStatus();
}

absl::Status SqliteStore::CommitModule(const UploadRecord& u, const ExpertRecord& e) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  absl::Status result = [&]() -> absl::Status {
    Statement su(db_, kUpdateUploadSql);
    BindUpload(su, u);
    su.Bind(u.session_id);
    if (absl::Status s = su.Run("committing the upload"); !s.ok()) return s;
    Statement se(db_,
                 "UPDATE experts SET module_sha256 = ?, module_size = ?, tokens_trained = ?, updated_unix = ?, "
                 "state = CASE WHEN state = 'registered' THEN 'uploaded' ELSE state END "
                 "WHERE expert_id = ? AND state != 'retired'");
    se.Bind(e.module_sha256).Bind(e.module_size).Bind(e.tokens_trained).Bind(e.updated_unix).Bind(e.expert_id);
    if (absl::Status s = se.Run("attaching the module"); !s.ok()) return s;
    if (sqlite3_changes(db_) == 0) {
      return absl::FailedPreconditionError(absl::StrCat("expert '", e.expert_id, "' was retired (or removed) meanwhile"));
    }
    return absl::OkStatus();
  }();
  if (!result.ok()) {
    Exec("ROLLBACK").IgnoreError();
    return result;
  }
  return Exec("COMMIT");
}

absl::Status SqliteStore::AddRelease(const ReleaseRecord& r) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat("INSERT INTO releases (", kReleaseColumns, ") VALUES (?, ?, ?, ?, ?)").c_str());
  s.Bind(r.release_id).Bind(r.anchor_id).Bind(r.manifest_json).Bind(r.manifest_sha256).Bind(r.created_unix);
  return s.Run(absl::StrCat("adding release '", r.release_id, "'"));
}

absl::StatusOr<ReleaseRecord> SqliteStore::GetRelease(const std::string& release_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return QueryOne<ReleaseRecord>(db_, absl::StrCat("SELECT ", kReleaseColumns, " FROM releases WHERE release_id = ?"),
                                 release_id, ReadRelease, "release");
}

absl::StatusOr<std::vector<ReleaseRecord>> SqliteStore::ListReleases() {
  std::lock_guard<std::mutex> lock(mu_);
  return Query<ReleaseRecord>(db_, absl::StrCat("SELECT ", kReleaseColumns, " FROM releases ORDER BY created_unix, release_id"),
                              ReadRelease);
}

absl::StatusOr<bool> SqliteStore::IsBlobReferenced(const std::string& sha256) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_,
              "SELECT (SELECT COUNT(*) FROM experts WHERE module_sha256 = ?1) + "
              "(SELECT COUNT(*) FROM uploads WHERE blob_sha256 = ?1 AND state != 'rejected') + "
              "(SELECT COUNT(*) FROM anchors WHERE instr(files_json, ?1) > 0) + "
              "(SELECT COUNT(*) FROM releases WHERE instr(manifest_json, ?1) > 0)");
  s.Bind(sha256);
  if (s.Step() != SQLITE_ROW) return s.Error("checking blob references");
  return s.Int(0) > 0;
}

}  // namespace flexfed
