#include "common/client/coordinator_client.h"

#include <grpcpp/grpcpp.h>
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/core/anchor_manifest.h"
#include "common/core/file_util.h"
#include "common/core/sha256.h"
#include "flexfed/v1/version.h"

namespace flexfed {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kChunkSize = 4ull << 20;

// RESOURCE_EXHAUSTED: the coordinator's per-caller limits (streams, calls in flight) and a full disk,
// which all pass with time.
bool Retryable(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s) || absl::IsAborted(s) || absl::IsResourceExhausted(s);
}

void Backoff(int attempt, const RetryPolicy& p) {
  static thread_local std::mt19937 rng(std::random_device{}());
  const double base = std::min(p.max_backoff_seconds, p.first_backoff_seconds * std::pow(2.0, attempt));
  std::uniform_real_distribution<double> jitter(0.5 * base, base);  // "equal jitter"
  std::this_thread::sleep_for(std::chrono::duration<double>(jitter(rng)));
}

// Runs `call` until it succeeds, fails with a non-retryable error, or the attempts run out.
template <typename Call>
auto WithRetries(const RetryPolicy& p, ProgressReporter* progress, Call call) -> decltype(call()) {
  for (int attempt = 0;; ++attempt) {
    auto result = call();
    absl::Status s;
    if constexpr (std::is_same_v<decltype(result), absl::Status>) {
      s = result;
    } else {
      s = result.status();
    }
    if (s.ok() || !Retryable(s) || attempt + 1 >= p.attempts) return result;
    if (progress != nullptr) progress->Line(absl::StrCat("coordinator unavailable (", s.message(), "); retrying"));
    Backoff(attempt, p);
  }
}

// A blob's chunks are hashed twice — each chunk alone (to check it against the manifest) and all of
// them in order (the blob's name) — with the running whole-blob hash on a second thread, so a
// transfer waits for one pass of SHA-256, not two. The bytes given to Add must stay unchanged until
// the next Add or Finish returns (callers alternate two buffers).
class TwoWayHasher {
 public:
  TwoWayHasher() = default;
  TwoWayHasher(const TwoWayHasher&) = delete;
  TwoWayHasher& operator=(const TwoWayHasher&) = delete;
  ~TwoWayHasher() {
    if (pending_.valid()) pending_.wait();
  }
  // Returns the chunk's SHA-256; the whole-blob hash takes the chunk in on the other thread.
  std::string Add(std::string_view chunk) {
    if (pending_.valid()) pending_.get();
    pending_ = std::async(std::launch::async, [this, chunk] { whole_.Update(chunk); });
    return Sha256Hex(chunk);
  }
  std::string Finish() {
    if (pending_.valid()) pending_.get();
    return whole_.HexDigest();
  }

 private:
  Sha256 whole_;
  std::future<void> pending_;
};

}  // namespace

absl::Status ToStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::StatusOr<ClientIdentity> ClientIdentity::Load(const std::string& dir) {
  ClientIdentity id;
  absl::StatusOr<std::string> ca = ReadFile((fs::path(dir) / "ca.crt").string());
  if (!ca.ok()) return absl::NotFoundError(absl::StrCat(dir, ": no ca.crt; enroll first (or point --identity to the folder)"));
  id.ca_cert_pem = *ca;
  absl::StatusOr<std::string> cert = ReadFile((fs::path(dir) / "client.crt").string());
  absl::StatusOr<std::string> key = ReadFile((fs::path(dir) / "client.key").string());
  if (cert.ok() && key.ok()) {
    id.cert_pem = *cert;
    id.key_pem = *key;
  }
  return id;
}

absl::Status ClientIdentity::Save(const std::string& dir) const {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create: ", ec.message()));
  ::chmod(dir.c_str(), 0700);
  if (absl::Status s = WriteFileAtomically((fs::path(dir) / "ca.crt").string(), ca_cert_pem); !s.ok()) return s;
  if (!cert_pem.empty()) {
    if (absl::Status s = WriteFileAtomically((fs::path(dir) / "client.crt").string(), cert_pem); !s.ok()) return s;
  }
  if (!key_pem.empty()) {
    const std::string key = (fs::path(dir) / "client.key").string();
    if (absl::Status s = WriteFileAtomically(key, key_pem); !s.ok()) return s;
    ::chmod(key.c_str(), 0600);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Connect(const std::string& address, const ClientIdentity& id) {
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = id.ca_cert_pem;  // only the pinned project CA is trusted
  tls.pem_cert_chain = id.cert_pem;
  tls.pem_private_key = id.key_pem;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(16 << 20);
  args.SetMaxSendMessageSize(16 << 20);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 60000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  std::unique_ptr<CoordinatorClient> c(new CoordinatorClient());
  c->channel_ = grpc::CreateCustomChannel(address, grpc::SslCredentials(tls), args);
  c->enrollment_ = v1::Enrollment::NewStub(c->channel_);
  c->owner_ = v1::Owner::NewStub(c->channel_);
  c->admin_ = v1::Admin::NewStub(c->channel_);
  return c;
}

std::unique_ptr<grpc::ClientContext> CoordinatorClient::NewContext() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->AddMetadata(kProtocolHeader, kProtocolVersion);
  // Fail fast when the coordinator cannot be reached (transfers retry UNAVAILABLE with backoff);
  // a unary call that got through but hangs is cut after a minute.
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  return ctx;
}

absl::StatusOr<v1::CommitUploadResponse> CoordinatorClient::UploadFile(const std::string& path, const std::string& expert_id,
                                                                       ProgressReporter* progress, const RetryPolicy& retry) {
  // The manifest: size, whole-file and per-chunk SHA-256, computed streaming.
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  v1::Manifest manifest;
  manifest.set_chunk_size(kChunkSize);
  std::string bufs[2] = {std::string(kChunkSize, '\0'), std::string(kChunkSize, '\0')};
  TwoWayHasher hasher;  // after the buffers: destroyed (waiting for its thread) before them
  uint64_t size = 0;
  for (uint64_t i = 0;; ++i) {
    std::string& buf = bufs[i % 2];  // the other one may still be in the whole-blob hash
    in.read(buf.data(), static_cast<std::streamsize>(kChunkSize));
    const std::streamsize n = in.gcount();
    if (n <= 0) break;
    v1::ChunkInfo* c = manifest.add_chunks();
    c->set_index(i);
    c->set_size(static_cast<uint64_t>(n));
    c->set_sha256(hasher.Add(std::string_view(buf.data(), static_cast<size_t>(n))));
    size += static_cast<uint64_t>(n);
  }
  manifest.mutable_blob()->set_sha256(hasher.Finish());
  manifest.mutable_blob()->set_size(size);

  auto begin = [&]() -> absl::StatusOr<v1::UploadStatus> {
    v1::UploadStatus status;
    std::unique_ptr<grpc::ClientContext> ctx = NewContext();
    if (expert_id.empty()) {
      grpc::Status s = admin_->BeginBlobUpload(ctx.get(), manifest, &status);
      if (!s.ok()) return ToStatus(s);
      return status;
    }
    v1::BeginUploadRequest r;
    r.set_expert_id(expert_id);
    *r.mutable_manifest() = manifest;
    grpc::Status s = owner_->BeginUpload(ctx.get(), r, &status);
    if (!s.ok()) return ToStatus(s);
    return status;
  };
  const auto start = std::chrono::steady_clock::now();
  for (int round = 0;; ++round) {
    absl::StatusOr<v1::UploadStatus> status = WithRetries(retry, progress, begin);
    if (!status.ok()) return status.status();
    if (round == 0 && progress != nullptr && status->missing_size() < manifest.chunks_size()) {
      progress->Line(absl::StrCat("resuming: ", manifest.chunks_size() - status->missing_size(), " of ", manifest.chunks_size(),
                                  " chunks already at the coordinator"));
    }
    for (uint64_t index : status->missing()) {
      if (index >= static_cast<uint64_t>(manifest.chunks_size())) {
        return absl::InternalError(absl::StrCat("the coordinator asked for chunk ", index, " of a ", manifest.chunks_size(),
                                                "-chunk upload; this client and that coordinator disagree, tell the operator"));
      }
    }
    if (status->missing_size() > 0) {
      // Stream the missing chunks; a broken stream is retried by asking again what is missing.
      std::unique_ptr<grpc::ClientContext> ctx = NewContext();
      ctx->set_deadline(std::chrono::system_clock::time_point::max());  // long stream: keepalive bounds idleness
      v1::UploadStatus reply;
      std::unique_ptr<grpc::ClientWriter<v1::UploadChunk>> writer =
          expert_id.empty() ? admin_->UploadBlobChunks(ctx.get(), &reply) : owner_->UploadChunks(ctx.get(), &reply);
      uint64_t sent = size;
      for (uint64_t index : status->missing()) sent -= manifest.chunks(static_cast<int>(index)).size();
      for (uint64_t index : status->missing()) {
        v1::UploadChunk chunk;
        chunk.set_session_id(status->session_id());
        chunk.set_index(index);
        std::string data(manifest.chunks(static_cast<int>(index)).size(), '\0');
        in.clear();
        in.seekg(static_cast<std::streamoff>(index * kChunkSize));
        in.read(data.data(), static_cast<std::streamsize>(data.size()));
        // The coordinator checks every chunk against the manifest; a file changed since the
        // manifest was made is refused there ("does not match the manifest").
        chunk.set_sha256(manifest.chunks(static_cast<int>(index)).sha256());
        chunk.set_data(std::move(data));
        if (!writer->Write(chunk)) break;
        sent += chunk.data().size();
        if (progress != nullptr) {
          const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          progress->Transfer("uploaded", std::min(sent, size), size, secs);
        }
      }
      writer->WritesDone();
      absl::Status s = ToStatus(writer->Finish());
      if (!s.ok() && !(Retryable(s) && round + 1 < retry.attempts)) return s;
      if (!s.ok()) {
        Backoff(round, retry);
        continue;  // ask again what is missing
      }
    }
    v1::CommitUploadRequest commit;
    commit.set_session_id(status->session_id());
    absl::StatusOr<v1::CommitUploadResponse> result = WithRetries(retry, progress, [&]() -> absl::StatusOr<v1::CommitUploadResponse> {
      std::unique_ptr<grpc::ClientContext> ctx = NewContext();
      ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::hours(1));  // validation of a large module
      v1::CommitUploadResponse out;
      if (expert_id.empty()) {
        v1::BlobRef blob;
        grpc::Status s = admin_->CommitBlob(ctx.get(), commit, &blob);
        if (!s.ok()) return ToStatus(s);
        *out.mutable_blob() = blob;
        return out;
      }
      grpc::Status s = owner_->CommitUpload(ctx.get(), commit, &out);
      if (!s.ok()) return ToStatus(s);
      return out;
    });
    if (result.ok() || !absl::IsFailedPrecondition(result.status()) || round + 1 >= retry.attempts) {
      if (progress != nullptr) progress->Finish();
      return result;
    }
    // FailedPrecondition: chunks went missing (e.g. the coordinator lost its staging); send again.
  }
}

absl::Status CoordinatorClient::DownloadAnchorFiles(const v1::Anchor& anchor, const std::string& dir, ProgressReporter* progress) {
  // The names come from the coordinator: nothing is written until they all stay inside `dir`.
  std::vector<AnchorFile> listed;
  for (const v1::AnchorFile& f : anchor.files()) listed.push_back({f.name(), f.blob().sha256(), f.blob().size()});
  if (absl::Status s = CheckAnchorFiles(listed); !s.ok()) {
    return absl::DataLossError(absl::StrCat("the coordinator's anchor ", anchor.anchor_id(), " cannot be pulled: ", s.message(),
                                            " (tell the operator; nothing was written)"));
  }
  for (const v1::AnchorFile& f : anchor.files()) {
    const fs::path dest = fs::path(dir) / f.name();
    if (fs::exists(dest) && Sha256File(dest.string()).value_or("") == f.blob().sha256()) continue;  // already here
    std::error_code ec;
    fs::create_directories(dest.parent_path(), ec);
    if (ec) return absl::InternalError(absl::StrCat(dest.parent_path().string(), ": cannot create directory: ", ec.message()));
    if (progress != nullptr) progress->Line(absl::StrCat("downloading ", f.name()));
    if (absl::Status s = DownloadBlob(f.blob().sha256(), dest.string(), progress); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status CoordinatorClient::DownloadBlob(const std::string& sha256, const std::string& path, ProgressReporter* progress,
                                             const RetryPolicy& retry) {
  absl::StatusOr<v1::Manifest> manifest = WithRetries(retry, progress, [&]() -> absl::StatusOr<v1::Manifest> {
    v1::GetManifestRequest r;
    r.set_sha256(sha256);
    v1::Manifest m;
    std::unique_ptr<grpc::ClientContext> ctx = NewContext();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::hours(1));
    grpc::Status s = owner_->GetManifest(ctx.get(), r, &m);
    if (!s.ok()) return ToStatus(s);
    return m;
  });
  if (!manifest.ok()) return manifest.status();
  const uint64_t size = manifest->blob().size(), chunk = manifest->chunk_size();
  const std::string part = path + ".part";
  // Keep the verified whole chunks of an earlier attempt; the whole-blob hash runs along.
  uint64_t have = 0;
  std::string bufs[2];  // chunk i is in bufs[i % 2] while the whole-blob hash takes it in
  TwoWayHasher hasher;  // after the buffers: destroyed (waiting for its thread) before them
  {
    std::error_code ec;
    uint64_t existing = fs::exists(part, ec) ? fs::file_size(part, ec) : 0;
    std::ifstream in(part, std::ios::binary);
    for (int i = 0; i < manifest->chunks_size() && have + manifest->chunks(i).size() <= existing; ++i) {
      std::string& buf = bufs[i % 2];
      buf.resize(manifest->chunks(i).size());
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      // Checked before it joins the whole-blob hash (resuming is rare: the chunk is hashed twice).
      if (Sha256Hex(buf) != manifest->chunks(i).sha256()) break;
      hasher.Add(buf);
      have += buf.size();
    }
    fs::resize_file(part, have, ec);
  }
  const auto start = std::chrono::steady_clock::now();
  for (int attempt = 0; have < size; ++attempt) {
    std::ofstream out(part, std::ios::binary | std::ios::app);
    v1::DownloadRequest r;
    r.set_sha256(sha256);
    r.set_offset(have);
    std::unique_ptr<grpc::ClientContext> ctx = NewContext();
    ctx->set_deadline(std::chrono::system_clock::time_point::max());
    std::unique_ptr<grpc::ClientReader<v1::DataChunk>> reader = owner_->Download(ctx.get(), r);
    v1::DataChunk data;
    std::string pending;  // bytes of the chunk being assembled, verified before they are kept
    while (reader->Read(&data)) {
      if (pending.empty()) pending.swap(*data.mutable_data());  // the usual case: one message, one chunk
      else pending += data.data();
      while (have < size) {
        const uint64_t index = have / chunk;
        const uint64_t need = manifest->chunks(static_cast<int>(index)).size();
        if (pending.size() < need) break;
        std::string& buf = bufs[index % 2];
        if (pending.size() == need) {
          buf.swap(pending);
          pending.clear();
        } else {
          buf.assign(pending, 0, need);
          pending.erase(0, need);
        }
        if (hasher.Add(buf) != manifest->chunks(static_cast<int>(index)).sha256()) {
          return absl::DataLossError(absl::StrCat("chunk ", index, " of ", sha256, " arrived corrupted; run the command again"));
        }
        out.write(buf.data(), static_cast<std::streamsize>(need));
        have += need;
      }
      if (progress != nullptr) {
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        progress->Transfer("downloaded", have, size, secs);
      }
    }
    absl::Status s = ToStatus(reader->Finish());
    if (!s.ok()) {
      if (!Retryable(s) || attempt + 1 >= retry.attempts) return s;
      Backoff(attempt, retry);
    }
  }
  if (progress != nullptr) progress->Finish();
  if (hasher.Finish() != sha256) return absl::DataLossError(absl::StrCat(path, ": downloaded bytes do not match ", sha256));
  std::error_code ec;
  fs::rename(part, path, ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": cannot move into place: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace flexfed
