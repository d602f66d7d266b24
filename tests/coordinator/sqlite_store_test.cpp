// Specification of the SQLite metadata store (coordinator/sqlite_store.h).
#include <catch2/catch.hpp>

#include <sqlite3.h>

#include "coordinator/sqlite_store.h"
#include "tests/temp_dir.h"

namespace flexfed {
namespace {

using testing::TempDir;

AnchorRecord Anchor(const std::string& id, int64_t t) { return {id, "[{\"sha256\":\"" + id + "\"}]", "cfg", t, "", false}; }

TEST_CASE("a new database is migrated to the newest schema, in WAL mode", "[sqlite_store]") {
  TempDir dir;
  auto store = *SqliteStore::Open(dir / "meta.db");
  CHECK(store->schema_version() == SqliteStore::kSchemaVersion);
  store.reset();
  auto again = *SqliteStore::Open(dir / "meta.db");  // re-opening applies nothing twice
  CHECK(again->schema_version() == SqliteStore::kSchemaVersion);
  sqlite3* db;
  REQUIRE(sqlite3_open((dir / "meta.db").c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* s;
  sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &s, nullptr);
  REQUIRE(sqlite3_step(s) == SQLITE_ROW);
  CHECK(std::string(reinterpret_cast<const char*>(sqlite3_column_text(s, 0))) == "wal");
  sqlite3_finalize(s);
  sqlite3_close(db);
}

TEST_CASE("a database from a newer FlexFed is refused", "[sqlite_store]") {
  TempDir dir;
  sqlite3* db;
  REQUIRE(sqlite3_open((dir / "meta.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db, "PRAGMA user_version = 99", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  absl::StatusOr<std::unique_ptr<SqliteStore>> store = SqliteStore::Open(dir / "meta.db");
  CHECK(absl::IsFailedPrecondition(store.status()));
  CHECK_THAT(std::string(store.status().message()), Catch::Contains("newer"));
}

TEST_CASE("one open upload per expert: the database refuses a second, and schema 3 repairs older stores", "[sqlite_store]") {
  TempDir dir;
  const auto upload = [](const std::string& session, const std::string& expert, int64_t t) {
    return UploadRecord{session, expert, "acme", "{}", std::string(64, session.back()), 1, "open", "", "", t, t};
  };
  {
    auto store = *SqliteStore::Open(dir / "meta.db");
    REQUIRE(store->AddUpload(upload("s1", "acme/math", 1)).ok());
    CHECK(absl::IsAlreadyExists(store->AddUpload(upload("s2", "acme/math", 2))));
    REQUIRE(store->AddUpload(upload("s3", "acme/code", 2)).ok());                        // another expert
    REQUIRE(store->AddUpload(upload("s4", "", 3)).ok());                                 // operator blobs:
    REQUIRE(store->AddUpload(upload("s5", "", 3)).ok());                                 // no expert, no limit
  }
  // A schema-2 store as concurrent BeginUploads left it: three open uploads of one expert.
  sqlite3* db;
  REQUIRE(sqlite3_open((dir / "meta.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db,
                       "DROP INDEX one_open_upload_per_expert; ALTER TABLE uploads DROP COLUMN policy; PRAGMA user_version = 2;"
                       "INSERT INTO uploads (session_id, expert_id, owner_id, manifest_json, blob_sha256, blob_size, state,"
                       " started_unix, updated_unix) VALUES ('s6', 'acme/math', 'acme', '{}', 'x', 1, 'open', 5, 5),"
                       " ('s7', 'acme/math', 'acme', '{}', 'y', 1, 'open', 9, 9)",
                       nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  auto store = *SqliteStore::Open(dir / "meta.db");
  CHECK(store->schema_version() == SqliteStore::kSchemaVersion);
  const std::vector<UploadRecord> open = *store->OpenUploadsOf("acme/math");
  REQUIRE(open.size() == 1);
  CHECK(open[0].session_id == "s7");  // the most recently updated
  for (const std::string id : {"s1", "s6"}) {
    CHECK(store->GetUpload(id)->state == "rejected");
    CHECK(store->GetUpload(id)->rejection == "superseded");
  }
  CHECK(store->GetUpload("s3")->state == "open");
  CHECK(store->GetUpload("s5")->state == "open");
  CHECK(absl::IsAlreadyExists(store->AddUpload(upload("s8", "acme/math", 10))));
}

TEST_CASE("anchors: one is current", "[sqlite_store]") {
  TempDir dir;
  auto store = *SqliteStore::Open(dir / "meta.db");
  CHECK(absl::IsNotFound(store->GetAnchor("").status()));
  REQUIRE(store->AddAnchor(Anchor(std::string(64, '1'), 1), true).ok());
  REQUIRE(store->AddAnchor(Anchor(std::string(64, '2'), 2), true).ok());
  REQUIRE(store->AddAnchor(Anchor(std::string(64, '3'), 3), false).ok());
  CHECK(store->GetAnchor("")->anchor_id == std::string(64, '2'));
  CHECK(store->ListAnchors()->size() == 3);
  CHECK(absl::IsAlreadyExists(store->AddAnchor(Anchor(std::string(64, '1'), 4), false)));
  CHECK(store->GetAnchor("")->anchor_id == std::string(64, '2'));  // a failed add changes nothing
}

TEST_CASE("owners, experts and uploads round-trip and commit together", "[sqlite_store]") {
  TempDir dir;
  auto store = *SqliteStore::Open(dir / "meta.db");
  REQUIRE(store->AddAnchor(Anchor(std::string(64, 'a'), 1), true).ok());
  OwnerRecord o{"acme", "ACME Corp", 10, std::string(64, 't'), 100, "", 0, false, "", 0};
  REQUIRE(store->AddOwner(o).ok());
  CHECK(absl::IsAlreadyExists(store->AddOwner(o)));
  o.revoked = true;
  o.revoked_reason = "key stolen";
  REQUIRE(store->UpdateOwner(o).ok());
  CHECK(store->GetOwner("acme")->revoked_reason == "key stolen");
  CHECK(absl::IsNotFound(store->GetOwner("nobody").status()));

  ExpertRecord e{"acme/math", "acme", "math", "arithmetic", std::string(64, 'a'), "registered", "", 0, 0, 10, 10};
  REQUIRE(store->AddExpert(e).ok());
  ExpertRecord orphan = e;
  orphan.expert_id = "ghost/x";
  orphan.owner_id = "ghost";
  CHECK_FALSE(store->AddExpert(orphan).ok());  // foreign keys hold

  UploadRecord u{"00000000000000000000000000000001", "acme/math", "acme", "{}", std::string(64, 'm'), 123, "open", "", "", 11, 11};
  REQUIRE(store->AddUpload(u).ok());
  CHECK(*store->IsBlobReferenced(std::string(64, 'm')));
  u.state = "committed";
  e.state = "uploaded";
  e.module_sha256 = u.blob_sha256;
  REQUIRE(store->CommitModule(u, e).ok());
  CHECK(store->GetExpert("acme/math")->module_sha256 == std::string(64, 'm'));
  CHECK(store->GetUpload(u.session_id)->state == "committed");

  // A commit that cannot attach the module leaves the upload untouched too.
  UploadRecord u2 = u;
  u2.session_id = "00000000000000000000000000000002";
  u2.state = "open";
  REQUIRE(store->AddUpload(u2).ok());
  u2.state = "committed";
  ExpertRecord missing = e;
  missing.expert_id = "acme/none";
  CHECK_FALSE(store->CommitModule(u2, missing).ok());
  CHECK(store->GetUpload(u2.session_id)->state == "open");
  CHECK(store->ListUploads(10)->size() == 2);
  CHECK(*store->IsBlobReferenced(std::string(64, 'a')));   // the anchor's files
  CHECK_FALSE(*store->IsBlobReferenced(std::string(64, 'z')));
}

TEST_CASE("releases are immutable and keep the blobs they name", "[sqlite_store]") {
  TempDir dir;
  const std::string module(64, 'c');
  {
    auto store = *SqliteStore::Open(dir / "meta.db");
    REQUIRE(store->AddAnchor(Anchor(std::string(64, 'a'), 1), true).ok());
    CHECK_FALSE(*store->IsBlobReferenced(module));
    const ReleaseRecord r{"rel-0001", std::string(64, 'a'), "{\"module_sha256\": \"" + module + "\"}", std::string(64, 'd'), 5};
    REQUIRE(store->AddRelease(r).ok());
    CHECK(absl::IsAlreadyExists(store->AddRelease(r)));
    CHECK(store->GetRelease("rel-0001")->manifest_json == r.manifest_json);
    CHECK(absl::IsNotFound(store->GetRelease("rel-0002").status()));
    CHECK(store->ListReleases()->size() == 1);
    CHECK(*store->IsBlobReferenced(module));  // no garbage collection of a released module
  }
  // Not even SQL can change or delete a release.
  sqlite3* db;
  REQUIRE(sqlite3_open((dir / "meta.db").c_str(), &db) == SQLITE_OK);
  CHECK(sqlite3_exec(db, "UPDATE releases SET manifest_json = '{}'", nullptr, nullptr, nullptr) != SQLITE_OK);
  CHECK(sqlite3_exec(db, "DELETE FROM releases", nullptr, nullptr, nullptr) != SQLITE_OK);
  sqlite3_close(db);
  CHECK((*SqliteStore::Open(dir / "meta.db"))->ListReleases()->size() == 1);
}

}  // namespace
}  // namespace flexfed
