#include "coordinator/blob_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/core/sha256.h"
#include <nlohmann/json.hpp>

namespace flexfed {

namespace fs = std::filesystem;

// Writes `data` to `final_path` atomically (a uniquely named temporary beside it, fsync, rename).
static absl::Status WriteDurably(const std::string& final_path, const std::string& data) {
  std::error_code ec;
  fs::create_directories(fs::path(final_path).parent_path(), ec);
  if (ec) return absl::InternalError(absl::StrCat(final_path, ": cannot create folder: ", ec.message()));
  return WriteFileAtomically(final_path, data);
}

static void SyncDirectory(const std::string& dir) {
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

static bool IsTemporary(const fs::path& p) { return p.filename().string().find(".tmp.") != std::string::npos; }


bool IsValidSha256(const std::string& hex) {
  return hex.size() == 64 && hex.find_first_not_of("0123456789abcdef") == std::string::npos;
}

bool IsValidSessionId(const std::string& session) {
  return session.size() >= 16 && session.size() <= 64 &&
         session.find_first_not_of("0123456789abcdef") == std::string::npos;
}

uint64_t ChunkLayout::ChunkBytes(uint64_t index) const {
  const uint64_t begin = index * chunk_size;
  return begin >= size ? 0 : std::min(chunk_size, size - begin);
}

absl::Status ChunkLayout::Validate() const {
  if (!IsValidSha256(sha256)) return absl::InvalidArgumentError("manifest: blob sha256 is not 64 lowercase hex digits");
  if (chunk_size < (64u << 10) || chunk_size > kMaxChunkSize) {
    return absl::InvalidArgumentError(absl::StrCat("manifest: chunk_size ", chunk_size, " is outside [64 KiB, 8 MiB]"));
  }
  // Ceiling division that cannot wrap (size + chunk_size - 1 overflows for sizes near 2^64).
  const uint64_t want = size / chunk_size + (size % chunk_size != 0 ? 1 : 0);
  if (chunk_sha256.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("manifest: ", chunk_sha256.size(), " chunks listed, a blob of ", size,
                                                   " bytes in chunks of ", chunk_size, " has ", want));
  }
  for (const std::string& h : chunk_sha256) {
    if (!IsValidSha256(h)) return absl::InvalidArgumentError("manifest: a chunk sha256 is not 64 lowercase hex digits");
  }
  return absl::OkStatus();
}

absl::StatusOr<ChunkLayout> LayoutOfFile(const std::string& path, uint64_t chunk_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  ChunkLayout layout;
  layout.chunk_size = chunk_size;
  Sha256 whole;
  std::string buf(chunk_size, '\0');
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(chunk_size));
    const std::streamsize n = in.gcount();
    if (n <= 0) break;
    whole.Update(buf.data(), static_cast<size_t>(n));
    layout.chunk_sha256.push_back(Sha256Hex(std::string_view(buf.data(), static_cast<size_t>(n))));
    layout.size += static_cast<uint64_t>(n);
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  layout.sha256 = whole.HexDigest();
  return layout;
}

absl::StatusOr<std::unique_ptr<BlobStore>> BlobStore::Open(const std::string& root) {
  std::unique_ptr<BlobStore> store(new BlobStore(root));
  std::error_code ec;
  for (const char* sub : {"blobs", "uploads", "tmp", "manifests"}) {
    fs::create_directories(fs::path(root) / sub, ec);
    if (ec) return absl::InternalError(absl::StrCat(root, "/", sub, ": cannot create: ", ec.message()));
  }
  // Orphans of a crash: everything in tmp/, and half-written temporaries beside chunks.
  for (const auto& entry : fs::directory_iterator(fs::path(root) / "tmp", ec)) {
    fs::remove_all(entry.path(), ec);
    ++store->orphans_at_open_;
  }
  for (const auto& entry : fs::directory_iterator(fs::path(root) / "manifests", ec)) {
    if (entry.is_regular_file() && IsTemporary(entry.path())) {
      fs::remove(entry.path(), ec);
      ++store->orphans_at_open_;
    }
  }
  for (auto it = fs::recursive_directory_iterator(fs::path(root) / "uploads", ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_regular_file() && IsTemporary(it->path())) {
      fs::remove(it->path(), ec);
      ++store->orphans_at_open_;
    }
  }
  return store;
}

std::string BlobStore::PathOf(const std::string& sha256) const {
  return (fs::path(root_) / "blobs" / sha256.substr(0, 2) / sha256.substr(2, 2) / sha256).string();
}

bool BlobStore::Has(const std::string& sha256) const {
  std::error_code ec;
  return IsValidSha256(sha256) && fs::is_regular_file(PathOf(sha256), ec);
}

absl::StatusOr<uint64_t> BlobStore::Size(const std::string& sha256) const {
  if (!Has(sha256)) return absl::NotFoundError(absl::StrCat("no blob ", sha256));
  std::error_code ec;
  return static_cast<uint64_t>(fs::file_size(PathOf(sha256), ec));
}

std::string BlobStore::SessionDir(const std::string& session) const {
  return (fs::path(root_) / "uploads" / session).string();
}

absl::StatusOr<std::string> BlobStore::PutFile(const std::string& path) {
  absl::StatusOr<std::string> sha = Sha256File(path);
  if (!sha.ok()) return sha.status();
  if (Has(*sha)) return *sha;
  const fs::path tmp = fs::path(root_) / "tmp" / absl::StrCat(*sha, ".put.", ::getpid(), ".", std::random_device{}());
  std::error_code ec;
  fs::copy_file(path, tmp, fs::copy_options::overwrite_existing, ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": cannot copy into the store: ", ec.message()));
  // fsync the copy before it becomes visible.
  int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  absl::StatusOr<std::string> check = Sha256File(tmp.string());
  if (!check.ok() || *check != *sha) {
    fs::remove(tmp, ec);
    return absl::DataLossError(absl::StrCat(path, ": changed while being copied; try again"));
  }
  fs::create_directories(fs::path(PathOf(*sha)).parent_path(), ec);
  fs::rename(tmp, PathOf(*sha), ec);
  if (ec) return absl::InternalError(absl::StrCat(PathOf(*sha), ": cannot move into place: ", ec.message()));
  return *sha;
}

absl::StatusOr<ChunkLayout> BlobStore::Manifest(const std::string& sha256) {
  if (!Has(sha256)) return absl::NotFoundError(absl::StrCat("no blob ", sha256));
  const std::string path = (fs::path(root_) / "manifests" / (sha256 + ".json")).string();
  absl::StatusOr<std::string> text = ReadFile(path);
  if (text.ok()) {
    nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
    if (!j.is_discarded() && j.value("sha256", "") == sha256) {
      ChunkLayout l;
      l.sha256 = sha256;
      l.size = j.value("size", uint64_t{0});
      l.chunk_size = j.value("chunk_size", uint64_t{0});
      l.chunk_sha256 = j.value("chunks", std::vector<std::string>{});
      if (l.Validate().ok()) return l;
    }
  }
  absl::StatusOr<ChunkLayout> l = LayoutOfFile(PathOf(sha256), kDefaultChunkSize);
  if (!l.ok()) return l.status();
  if (l->sha256 != sha256) return absl::DataLossError(absl::StrCat("blob ", sha256, " is damaged on disk"));
  nlohmann::json j = {{"sha256", l->sha256}, {"size", l->size}, {"chunk_size", l->chunk_size}, {"chunks", l->chunk_sha256}};
  WriteFileAtomically(path, j.dump()).IgnoreError();  // a cache: recomputed if lost
  return l;
}

absl::StatusOr<std::string> BlobStore::Read(const std::string& sha256, uint64_t offset, uint64_t length) const {
  if (!Has(sha256)) return absl::NotFoundError(absl::StrCat("no blob ", sha256));
  std::ifstream in(PathOf(sha256), std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string out(length, '\0');
  in.read(out.data(), static_cast<std::streamsize>(length));
  out.resize(static_cast<size_t>(std::max<std::streamsize>(0, in.gcount())));
  return out;
}

static std::string MarkerName(uint64_t index) { return absl::StrCat(index, ".ok"); }

absl::Status BlobStore::PutChunk(const std::string& session, const ChunkLayout& layout, uint64_t index,
                                 const std::string& data) {
  if (!IsValidSessionId(session)) return absl::InvalidArgumentError("malformed upload session id");
  if (index >= layout.chunk_sha256.size()) return absl::OutOfRangeError(absl::StrCat("chunk ", index, " is past the manifest"));
  if (data.size() != layout.ChunkBytes(index) || Sha256Hex(data) != layout.chunk_sha256[index]) {
    return absl::DataLossError(absl::StrCat("chunk ", index, " of session ", session,
                                            " does not match the manifest (corrupted in transit, or the file changed); send it again"));
  }
  const fs::path dir = SessionDir(session);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir.string(), ": cannot create: ", ec.message()));
  const std::string path = (dir / "data").string();
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    // The session's first chunk: its folder and data file are made durable once, here, so that
    // the markers below (which get no fsync) never outlive the file they vouch for.
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
      SyncDirectory(dir.string());
      SyncDirectory(dir.parent_path().string());
    }
  }
  if (fd < 0) return absl::InternalError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  const char* p = data.data();
  uint64_t left = data.size(), offset = index * layout.chunk_size;
  while (left > 0) {
    ssize_t n = ::pwrite(fd, p, left, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      absl::Status s = errno == ENOSPC ? absl::ResourceExhaustedError(absl::StrCat(path, ": disk full"))
                                       : absl::InternalError(absl::StrCat(path, ": write failed: ", std::strerror(errno)));
      ::close(fd);
      return s;
    }
    p += n;
    left -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  const bool durable = ::fdatasync(fd) == 0;
  ::close(fd);
  if (!durable) return absl::InternalError(absl::StrCat(path, ": fdatasync failed"));
  // The marker is created only after the data is durable: a crash in between loses the chunk's
  // mark, never marks bytes that are not there. It is empty, so it needs no fsync of its own (a
  // marker lost in a crash only means the chunk is sent again), nor a rename.
  const std::string marker = (dir / MarkerName(index)).string();
  int mfd = ::open(marker.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  if (mfd < 0) return absl::InternalError(absl::StrCat(marker, ": cannot create: ", std::strerror(errno)));
  ::close(mfd);
  return absl::OkStatus();
}

bool BlobStore::HasChunk(const std::string& session, uint64_t index) const {
  std::error_code ec;
  return IsValidSessionId(session) && fs::exists(fs::path(SessionDir(session)) / MarkerName(index), ec);
}

std::vector<uint64_t> BlobStore::MissingChunks(const std::string& session, const ChunkLayout& layout) const {
  // Every chunk, even of a blob already stored: a session proves it holds the bytes by sending
  // them (an owner who only knew another owner's module hash could otherwise claim the module).
  std::vector<uint64_t> missing;
  for (uint64_t i = 0; i < layout.chunk_sha256.size(); ++i) {
    if (!HasChunk(session, i)) missing.push_back(i);
  }
  return missing;
}

uint64_t BlobStore::ReceivedBytes(const std::string& session, const ChunkLayout& layout) const {
  uint64_t total = 0;
  for (uint64_t i = 0; i < layout.chunk_sha256.size(); ++i) {
    if (HasChunk(session, i)) total += layout.ChunkBytes(i);
  }
  return total;
}

absl::Status BlobStore::Assemble(const std::string& session, const ChunkLayout& layout) {
  if (absl::Status s = layout.Validate(); !s.ok()) return s;
  std::vector<uint64_t> missing = MissingChunks(session, layout);
  if (!missing.empty()) return absl::FailedPreconditionError(absl::StrCat("chunk ", missing[0], " has not been received"));
  const fs::path data = fs::path(SessionDir(session)) / "data";
  std::error_code ec;
  if (layout.size == 0) {  // no chunk ever made the session's folder
    fs::create_directories(data.parent_path(), ec);
    absl::Status s = WriteFileAtomically(data.string(), "");
    if (!s.ok()) return s;
  }
  if (fs::file_size(data, ec) != layout.size) {
    return absl::DataLossError(absl::StrCat(data.string(), " does not hold ", layout.size, " bytes; the session is damaged"));
  }
  // One sequential read: the whole blob's hash.
  Sha256 whole;
  {
    std::ifstream in(data, std::ios::binary);
    std::string buf(1 << 20, '\0');
    while (in) {
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      if (in.gcount() > 0) whole.Update(buf.data(), static_cast<size_t>(in.gcount()));
    }
  }
  if (whole.HexDigest() != layout.sha256) {
    // Find and unmark the damaged chunks so that they are sent again.
    int64_t dropped = 0;
    for (uint64_t i = 0; i < layout.chunk_sha256.size(); ++i) {
      std::ifstream in(data, std::ios::binary);
      in.seekg(static_cast<std::streamoff>(i * layout.chunk_size));
      std::string chunk(layout.ChunkBytes(i), '\0');
      in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
      if (Sha256Hex(chunk) != layout.chunk_sha256[i]) dropped += fs::remove(fs::path(SessionDir(session)) / MarkerName(i), ec) ? 1 : 0;
    }
    return absl::DataLossError(dropped > 0 ? absl::StrCat(dropped, " stored chunk(s) were damaged and dropped; send them again")
                                           : "the chunks do not add up to the manifest's SHA-256 (the manifest is wrong)");
  }
  int fd = ::open(data.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  // The verified bytes take the blob's name even where a copy is stored already: that copy may be
  // one damaged since it was written, and these are known good. A second name first, in the
  // session's folder, then renamed over the blob's (atomic): the session keeps its data until
  // the commit is recorded, so a commit that fails after this point (a full disk) is retried
  // without a chunk sent again.
  const fs::path staged = fs::path(SessionDir(session)) / "assembled";
  fs::remove(staged, ec);
  fs::create_directories(fs::path(PathOf(layout.sha256)).parent_path(), ec);
  if (::link(data.c_str(), staged.c_str()) != 0) {
    return absl::InternalError(absl::StrCat(staged.string(), ": cannot link the assembled blob: ", std::strerror(errno)));
  }
  fs::rename(staged, PathOf(layout.sha256), ec);
  if (ec) return absl::InternalError(absl::StrCat(PathOf(layout.sha256), ": cannot move into place: ", ec.message()));
  SyncDirectory(fs::path(PathOf(layout.sha256)).parent_path().string());
  // The upload's own layout serves downloads: no second pass over the blob to describe it.
  nlohmann::json j = {{"sha256", layout.sha256}, {"size", layout.size}, {"chunk_size", layout.chunk_size}, {"chunks", layout.chunk_sha256}};
  WriteFileAtomically((fs::path(root_) / "manifests" / (layout.sha256 + ".json")).string(), j.dump()).IgnoreError();
  return absl::OkStatus();
}

void BlobStore::DropSession(const std::string& session) {
  if (!IsValidSessionId(session)) return;
  std::error_code ec;
  fs::remove_all(SessionDir(session), ec);
}

std::vector<std::string> BlobStore::SessionFolders() const {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(fs::path(root_) / "uploads", ec)) out.push_back(entry.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

bool BlobStore::HasSessionFolder(const std::string& session) const {
  std::error_code ec;
  return IsValidSessionId(session) && fs::exists(SessionDir(session), ec);
}

std::vector<std::string> BlobStore::BlobNames(std::vector<std::string>* stray) const {
  std::vector<std::string> out;
  std::error_code ec;
  const fs::path blobs = fs::path(root_) / "blobs";
  for (auto it = fs::recursive_directory_iterator(blobs, ec); !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_directory()) continue;  // ab/ and ab/cd/ (empty ones are harmless)
    const std::string name = it->path().filename().string();
    if (it->is_regular_file() && !it->is_symlink() && IsValidSha256(name) && it->path() == fs::path(PathOf(name))) {
      out.push_back(name);
    } else if (stray != nullptr) {
      stray->push_back(fs::relative(it->path(), root_, ec).string());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> BlobStore::ManifestFiles() const {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(fs::path(root_) / "manifests", ec)) {
    if (!IsTemporary(entry.path())) out.push_back(entry.path().filename().string());  // one being written
  }
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<std::string> BlobStore::HashBlob(const std::string& sha256, const std::atomic<bool>* stop) const {
  if (!Has(sha256)) return absl::NotFoundError(absl::StrCat("no blob ", sha256));
  std::ifstream in(PathOf(sha256), std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat(PathOf(sha256), ": cannot open"));
  Sha256 h;
  std::string buf(1 << 20, '\0');
  while (in) {
    if (stop != nullptr && stop->load()) return absl::CancelledError("the store check was stopped");
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0) h.Update(buf.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(PathOf(sha256), ": read failed"));
  return h.HexDigest();
}

void BlobStore::RemoveBlob(const std::string& sha256) {
  if (!IsValidSha256(sha256)) return;
  std::error_code ec;
  fs::remove(PathOf(sha256), ec);
  fs::remove(fs::path(root_) / "manifests" / (sha256 + ".json"), ec);
}

absl::Status BlobStore::RemoveStray(const std::string& relative_path) {
  // Only something strictly inside blobs/, uploads/ or manifests/: at least two components, the
  // first of them one of those, none of them "..", and relative (an absolute path replaces the root).
  std::vector<std::string> parts;
  const fs::path rel = fs::path(relative_path).lexically_normal();
  for (const fs::path& part : rel) {
    if (!part.empty()) parts.push_back(part.string());
  }
  const bool inside = !relative_path.empty() && rel.is_relative() && parts.size() >= 2 &&
                      (parts[0] == "blobs" || parts[0] == "uploads" || parts[0] == "manifests") &&
                      std::none_of(parts.begin(), parts.end(), [](const std::string& p) { return p == ".." || p == "."; });
  if (!inside) {
    return absl::InvalidArgumentError(absl::StrCat(relative_path, ": not a path inside the store's blobs/, uploads/ or manifests/"));
  }
  std::error_code ec;
  fs::remove_all(fs::path(root_) / rel, ec);
  if (ec) return absl::InternalError(absl::StrCat((fs::path(root_) / rel).string(), ": cannot remove: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace flexfed
