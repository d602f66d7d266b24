// Content-addressed blob store on a filesystem (docs/ARCHITECTURE.md §6). Layout under ROOT:
//   blobs/ab/cd/<sha256>           complete blobs, immutable, named by their SHA-256
//   uploads/<session>/data         the blob being received, each chunk written at its offset
//   uploads/<session>/<index>.ok   marks chunk <index> as verified and durable in `data`
//   manifests/<sha256>.json        the chunk layout of a stored blob, for downloads
//   tmp/                           files being written; anything here at start-up is an orphan
// Every file is written to tmp/, fsynced and renamed into place, so a crash at any moment leaves
// either the old state or the new one, never a partial blob or chunk. A completed upload becomes a
// blob by one hashing read and a rename: its bytes are written to disk once. Thread-safe:
// concurrent writers of one chunk race harmlessly (same bytes at the same offset).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

// How a blob is cut into chunks: chunk i covers [i·chunk_size, min(size, (i+1)·chunk_size)).
struct ChunkLayout {
  std::string sha256;  // of the whole blob
  uint64_t size = 0;
  uint64_t chunk_size = 0;
  std::vector<std::string> chunk_sha256;

  uint64_t ChunkBytes(uint64_t index) const;
  // Checks counts and sizes are consistent (chunk_size in [64 KiB, 8 MiB], hashes well-formed).
  absl::Status Validate() const;
};

// Computes the layout of a file (streaming, constant memory).
absl::StatusOr<ChunkLayout> LayoutOfFile(const std::string& path, uint64_t chunk_size);

inline constexpr uint64_t kDefaultChunkSize = 4ull << 20;
inline constexpr uint64_t kMaxChunkSize = 8ull << 20;

class BlobStore {
 public:
  // Opens (creating) the store at `root` and removes orphans: tmp/, and temporaries beside chunk
  // manifests and in upload folders.
  static absl::StatusOr<std::unique_ptr<BlobStore>> Open(const std::string& root);

  bool Has(const std::string& sha256) const;
  std::string PathOf(const std::string& sha256) const;
  absl::StatusOr<uint64_t> Size(const std::string& sha256) const;
  // Copies a local file in (streaming), verifying nothing but computing its hash.
  absl::StatusOr<std::string> PutFile(const std::string& path);
  // The chunk layout of a stored blob (kDefaultChunkSize), computed once and kept beside it.
  absl::StatusOr<ChunkLayout> Manifest(const std::string& sha256);
  // Up to `length` bytes from `offset` (fewer at the end of the blob).
  absl::StatusOr<std::string> Read(const std::string& sha256, uint64_t offset, uint64_t length) const;

  // Upload sessions. Chunk `index` of `layout` is kept only if `data` hashes to its manifest entry;
  // it is written at its offset and marked received once durable.
  absl::Status PutChunk(const std::string& session, const ChunkLayout& layout, uint64_t index, const std::string& data);
  bool HasChunk(const std::string& session, uint64_t index) const;
  std::vector<uint64_t> MissingChunks(const std::string& session, const ChunkLayout& layout) const;
  uint64_t ReceivedBytes(const std::string& session, const ChunkLayout& layout) const;
  // Turns a complete session into the blob: one read hashing the received bytes, then a second
  // name renamed over the blob's; the blob appears under its name only when its SHA-256 and size
  // are right, and a stored copy of the same hash is replaced by the verified bytes. The session
  // keeps its data (the caller drops it once the commit is recorded). On a mismatch the damaged
  // chunks are found, unmarked and reported.
  absl::Status Assemble(const std::string& session, const ChunkLayout& layout);
  void DropSession(const std::string& session);

  // What the store holds, for the invariant check (Coordinator::CheckStore): upload folder names;
  // blob names at their place (`stray` gets paths under blobs/ that are not: wrong name or place,
  // not a regular file); chunk-manifest file names (not those being written).
  std::vector<std::string> SessionFolders() const;
  bool HasSessionFolder(const std::string& session) const;
  std::vector<std::string> BlobNames(std::vector<std::string>* stray) const;
  std::vector<std::string> ManifestFiles() const;
  // The SHA-256 of a stored blob's bytes, read 1 MiB at a time; Cancelled once `stop` is set.
  absl::StatusOr<std::string> HashBlob(const std::string& sha256, const std::atomic<bool>* stop = nullptr) const;
  // Removals for the check: a blob with its chunk manifest; a path under blobs/ or uploads/ or
  // manifests/ (relative to the store's root, checked to stay inside it).
  void RemoveBlob(const std::string& sha256);
  absl::Status RemoveStray(const std::string& relative_path);
  int64_t orphans_removed_at_open() const { return orphans_at_open_; }
  const std::string& root() const { return root_; }

 private:
  explicit BlobStore(std::string root) : root_(std::move(root)) {}
  std::string SessionDir(const std::string& session) const;
  std::string root_;
  int64_t orphans_at_open_ = 0;
};

// Session ids are server-made; anything else is refused before touching the filesystem.
bool IsValidSessionId(const std::string& session);
bool IsValidSha256(const std::string& hex);

}  // namespace flexfed
