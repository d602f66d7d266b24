// Specification of the content-addressed blob store (coordinator/blob_store.h).
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>

#include "common/core/file_util.h"
#include "common/core/sha256.h"
#include "coordinator/blob_store.h"
#include "tests/temp_dir.h"

namespace flexfed {
namespace {

using testing::TempDir;
namespace fs = std::filesystem;

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

TEST_CASE("a chunked upload assembles into a content-addressed blob", "[blob_store]") {
  TempDir dir;
  auto store = *BlobStore::Open(dir.path());
  const std::string data = RandomBytes(300'000, 1);
  REQUIRE(WriteFileAtomically(dir / "src", data).ok());
  ChunkLayout layout = *LayoutOfFile(dir / "src", 64 << 10);
  REQUIRE(layout.Validate().ok());
  CHECK(layout.chunk_sha256.size() == 5);  // 4 × 64 KiB + 37856 bytes
  CHECK(layout.ChunkBytes(4) == 300'000 - 4 * 65536);
  CHECK(layout.sha256 == Sha256Hex(data));

  const std::string session = "0123456789abcdef0123456789abcdef";
  CHECK(store->MissingChunks(session, layout) == std::vector<uint64_t>{0, 1, 2, 3, 4});
  for (uint64_t i : {3, 0, 4}) {
    std::string chunk = data.substr(i * 65536, layout.ChunkBytes(i));
    REQUIRE(store->PutChunk(session, layout, i, chunk).ok());
  }
  CHECK(store->MissingChunks(session, layout) == std::vector<uint64_t>{1, 2});
  CHECK(absl::IsFailedPrecondition(store->Assemble(session, layout)));  // not all there
  CHECK_FALSE(store->Has(layout.sha256));
  CHECK(store->ReceivedBytes(session, layout) == 2 * 65536 + layout.ChunkBytes(4));
  for (uint64_t i : {1, 2}) REQUIRE(store->PutChunk(session, layout, i, data.substr(i * 65536, 65536)).ok());
  REQUIRE(store->Assemble(session, layout).ok());
  CHECK(store->Has(layout.sha256));
  CHECK(*store->Size(layout.sha256) == data.size());
  CHECK(*store->Read(layout.sha256, 100, 50) == data.substr(100, 50));
  CHECK(store->Read(layout.sha256, 299'990, 50)->size() == 10);  // short read at the end
  // Another session for the same blob still sends every chunk: the bytes are the proof of
  // possession (issue #13, row 1); assembling it verifies them and keeps the one stored copy.
  CHECK(store->MissingChunks("ffffffffffffffffffffffffffffffff", layout).size() == layout.chunk_sha256.size());
}

// Issue #13, row 12: a manifest of 2^64 - 1 bytes and no chunks passed (the ceiling division wrapped).
TEST_CASE("manifest validation does not wrap on sizes near 2^64", "[blob_store]") {
  ChunkLayout l;
  l.sha256 = std::string(64, 'a');
  l.chunk_size = 64 << 10;
  l.size = UINT64_MAX;
  absl::Status s = l.Validate();
  CHECK(absl::IsInvalidArgument(s));
  CHECK_THAT(std::string(s.message()), Catch::Contains("0 chunks listed"));
}

TEST_CASE("corrupted chunks are refused and never stored", "[blob_store]") {
  TempDir dir;
  auto store = *BlobStore::Open(dir.path());
  const std::string session = "00000000000000000000000000000001";
  const std::string chunk = RandomBytes(1000, 2);
  REQUIRE(WriteFileAtomically(dir / "src", chunk).ok());
  ChunkLayout layout = *LayoutOfFile(dir / "src", 64 << 10);
  std::string corrupted = chunk;
  corrupted[10] ^= 1;
  absl::Status s = store->PutChunk(session, layout, 0, corrupted);
  CHECK(absl::IsDataLoss(s));
  CHECK_FALSE(store->HasChunk(session, 0));
  CHECK(absl::IsInvalidArgument(store->PutChunk("../../etc", layout, 0, chunk)));  // session ids are checked
  CHECK(absl::IsOutOfRange(store->PutChunk(session, layout, 7, chunk)));
}

TEST_CASE("a chunk damaged on disk after receipt is found at assembly and asked for again", "[blob_store]") {
  TempDir dir;
  auto store = *BlobStore::Open(dir.path());
  const std::string data = RandomBytes(200'000, 5);
  REQUIRE(WriteFileAtomically(dir / "src", data).ok());
  ChunkLayout layout = *LayoutOfFile(dir / "src", 64 << 10);
  const std::string session = "00000000000000000000000000000009";
  for (uint64_t i = 0; i < layout.chunk_sha256.size(); ++i) REQUIRE(store->PutChunk(session, layout, i, data.substr(i * 65536, layout.ChunkBytes(i))).ok());
  {  // flip one byte of chunk 2 on disk
    std::fstream f(dir / "uploads/00000000000000000000000000000009/data", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(2 * 65536 + 10);
    f.put(static_cast<char>(data[2 * 65536 + 10] ^ 0x40));
  }
  absl::Status s = store->Assemble(session, layout);
  CHECK(absl::IsDataLoss(s));
  CHECK_THAT(std::string(s.message()), Catch::Contains("1 stored chunk(s) were damaged"));
  CHECK(store->MissingChunks(session, layout) == std::vector<uint64_t>{2});
  CHECK_FALSE(store->Has(layout.sha256));
  REQUIRE(store->PutChunk(session, layout, 2, data.substr(2 * 65536, 65536)).ok());
  REQUIRE(store->Assemble(session, layout).ok());
  CHECK(*store->Read(layout.sha256, 0, 200'000) == data);
}

TEST_CASE("a manifest that lies about the whole blob is caught at assembly", "[blob_store]") {
  TempDir dir;
  auto store = *BlobStore::Open(dir.path());
  const std::string data = RandomBytes(70'000, 3);
  REQUIRE(WriteFileAtomically(dir / "src", data).ok());
  ChunkLayout layout = *LayoutOfFile(dir / "src", 64 << 10);
  const std::string session = "00000000000000000000000000000002";
  for (uint64_t i = 0; i < 2; ++i) REQUIRE(store->PutChunk(session, layout, i, data.substr(i * 65536, layout.ChunkBytes(i))).ok());
  ChunkLayout lie = layout;
  lie.sha256 = Sha256Hex("something else");
  CHECK(absl::IsDataLoss(store->Assemble(session, lie)));
  CHECK_FALSE(store->Has(lie.sha256));
  CHECK(fs::is_empty(dir / "tmp"));  // nothing half-written left behind
}

TEST_CASE("orphans of a crash are collected at open", "[blob_store]") {
  TempDir dir;
  { auto store = *BlobStore::Open(dir.path()); }
  REQUIRE(WriteFileAtomically(dir / "tmp/abc.partial", "half a blob").ok());
  fs::create_directories(dir / "uploads/00000000000000000000000000000003");
  REQUIRE(WriteFileAtomically(dir / "uploads/00000000000000000000000000000003/7.ok.tmp.123.456", "").ok());
  REQUIRE(WriteFileAtomically(dir / "uploads/00000000000000000000000000000003/6.ok", "").ok());
  auto store = *BlobStore::Open(dir.path());
  CHECK(store->orphans_removed_at_open() == 2);
  CHECK(store->HasChunk("00000000000000000000000000000003", 6));  // received chunks survive restarts
  CHECK_FALSE(store->HasChunk("00000000000000000000000000000003", 7));
}

TEST_CASE("the store lists its blobs, strays and manifests for the check, and removes only inside itself", "[blob_store]") {
  TempDir dir;
  auto store = *BlobStore::Open(dir.path());
  REQUIRE(WriteFileAtomically(dir / "a", "aaa").ok());
  REQUIRE(WriteFileAtomically(dir / "b", "bbb").ok());
  const std::string a = *store->PutFile(dir / "a"), b = *store->PutFile(dir / "b");
  REQUIRE(store->Manifest(a).ok());
  // A blob in the wrong place and a file with no blob's name: neither can ever be served.
  fs::create_directories(dir / "blobs/00/00");
  REQUIRE(WriteFileAtomically(dir.path() + "/blobs/00/00/" + a, "aaa").ok());
  REQUIRE(WriteFileAtomically(dir / "blobs/notes.txt", "x").ok());
  std::vector<std::string> stray;
  std::vector<std::string> blobs = store->BlobNames(&stray);
  std::vector<std::string> want = {a, b};
  std::sort(want.begin(), want.end());
  CHECK(blobs == want);
  std::sort(stray.begin(), stray.end());
  CHECK(stray == std::vector<std::string>{"blobs/00/00/" + a, "blobs/notes.txt"});
  CHECK(store->ManifestFiles() == std::vector<std::string>{a + ".json"});
  CHECK(*store->HashBlob(a) == a);
  std::atomic<bool> stop{true};
  CHECK(absl::IsCancelled(store->HashBlob(a, &stop).status()));
  // Damaged on disk: the hash says so.
  REQUIRE(WriteFileAtomically(store->PathOf(b), "bbX").ok());
  CHECK(*store->HashBlob(b) == Sha256Hex("bbX"));

  for (const char* outside : {"../a", "blobs/../../a", "blobs", "uploads/", "tmp/x", "/etc/passwd", ""}) {
    INFO(outside);
    CHECK(absl::IsInvalidArgument(store->RemoveStray(outside)));
  }
  CHECK(fs::exists(dir / "a"));
  REQUIRE(store->RemoveStray("blobs/notes.txt").ok());
  CHECK_FALSE(fs::exists(dir / "blobs/notes.txt"));
  store->RemoveBlob(a);
  CHECK_FALSE(store->Has(a));
  CHECK(store->ManifestFiles().empty());  // its manifest went with it
}

TEST_CASE("manifests are checked before use", "[blob_store]") {
  ChunkLayout l;
  l.sha256 = std::string(64, 'a');
  l.size = 10;
  l.chunk_size = 64 << 10;
  l.chunk_sha256 = {std::string(64, 'b')};
  CHECK(l.Validate().ok());
  l.chunk_size = 1 << 30;
  CHECK_THAT(std::string(l.Validate().message()), Catch::Contains("chunk_size"));
  l.chunk_size = 64 << 10;
  l.chunk_sha256.push_back(std::string(64, 'c'));
  CHECK_THAT(std::string(l.Validate().message()), Catch::Contains("2 chunks listed"));
  l.chunk_sha256 = {"XYZ"};
  CHECK_FALSE(l.Validate().ok());
}

}  // namespace
}  // namespace flexfed
