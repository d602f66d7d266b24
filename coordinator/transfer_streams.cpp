#include "coordinator/transfer_streams.h"

#include <algorithm>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "coordinator/service.h"

namespace flexfed {
namespace {

using grpc::CallbackServerContext;

// Both reactors follow one lifetime contract. gRPC owns a reactor from the handler's return until
// OnDone, where it deletes itself; gRPC calls OnDone once Finish was called and every reaction
// (OnReadDone, OnWriteDone) has returned. It knows nothing of the work a reactor posts to the work
// queue or parks in ChunkSlots, so a reactor calls Finish only when none of that is left: the thread
// that, under mu_, finds nothing outstanding calls FinishCall, once, and touches nothing after. Each
// piece of outstanding work is recorded under mu_ in the critical section that starts it and
// cleared only by that work's own end, in one critical section with everything else it does to the
// reactor (ChunkSlots never runs a callback inline, so it may be called with mu_ held). OnDone takes
// mu_ once before deleting, so every earlier critical section happens-before the destructor (which
// ThreadSanitizer then checks). Before issue #34 a half-close cleared "read pending" and set "reading
// done" in two steps; a chunk stored in between started a read that outlived the call.
//
// Admission happens in the constructor, on gRPC's thread: the caller's certificate names it and it
// is under its share of open streams, or the call is finished there and then, before any work is
// queued or any slot taken. An admitted stream is watched (StreamWatchdog) while it waits on its
// peer, and gives its place back when it finishes.

// Client-streaming chunk upload: each chunk is verified and stored as it arrives, on the work
// queue. A chunk is received first and takes a chunk slot once it is here (a stream waiting for a
// client that sends nothing holds none); while it waits for its slot no further chunk is read, and
// while it is stored the next one is received (at most kInFlight per stream being stored), so a
// transfer runs at about the slower of network and disk rather than their sum.
class UploadReactor : public grpc::ServerReadReactor<v1::UploadChunk> {
 public:
  UploadReactor(const ServiceParts& parts, CallbackServerContext* ctx, v1::UploadStatus* response, const std::string& role)
      : parts_(parts), ctx_(ctx), response_(response), watched_(ctx) {
    absl::StatusOr<std::string> caller = CallerOf(ctx);
    if (caller.ok() && !parts_.streams->TryEnter(*caller)) {
      caller = TooManyInFlight("transfer streams", *caller, parts_.streams->per_key());
    }
    if (!caller.ok()) {
      finished_ = true;  // nothing was started: the call ends here
      Finish(ToGrpc(caller.status()));
      return;
    }
    caller_ = *caller;
    parts_.watchdog->Add(&watched_);
    parts_.work->Post([this, role] { Start(role); });
  }

  void OnReadDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    watched_.PeerAnswered();
    if (!ok) {  // the client finished sending, went away, or the watchdog dropped the stream
      read_ = Reading::kEnded;
      Advance(lock);
      return;
    }
    read_ = Reading::kIdle;
    if (!chunk_.session_id().empty()) session_ = chunk_.session_id();
    chunk_.set_session_id(session_);
    auto mine = std::make_shared<v1::UploadChunk>();
    mine->Swap(&chunk_);
    ++in_flight_;
    ++queued_;
    parts_.slots->Acquire(caller_, [this, mine] { Stored(*mine); });
    Advance(lock);
  }
  void OnDone() override {
    { std::lock_guard<std::mutex> lock(mu_); }
    delete this;
  }

 private:
  static constexpr int kInFlight = 4;
  // kPending: a read is outstanding (and, at first, Start() is to run); kIdle: no read, one may
  // start; kEnded: no read will start again (the client finished, or the call is failing).
  enum class Reading { kPending, kIdle, kEnded };

  // On the work queue: authorizes the caller against the database, then asks for the first chunk.
  void Start(const std::string& role) {
    absl::StatusOr<PeerIdentity> who;
    try {
      who = Authorize(parts_.coordinator, ctx_, role, &pem_);
    } catch (const std::exception& e) {
      who = HandlerFailed(ctx_, e.what());
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (who.ok()) {
      who_ = *who;
      read_ = Reading::kIdle;
    } else {
      error_ = who.status();
      read_ = Reading::kEnded;
    }
    Advance(lock);
  }

  // On the work queue, holding a slot: stores one chunk and gives the slot back.
  void Stored(const v1::UploadChunk& mine) {
    std::unique_lock<std::mutex> lock(mu_);
    --queued_;
    const bool failed_already = !error_.ok();
    Advance(lock);  // the next chunk may be received while this one is stored; it counts in in_flight_
    absl::StatusOr<v1::UploadStatus> put = failed_already ? absl::StatusOr<v1::UploadStatus>(absl::AbortedError("")) : Store(mine);
    lock.lock();
    parts_.slots->Release(caller_);
    --in_flight_;
    if (!put.ok() && error_.ok()) error_ = put.status();
    Advance(lock);
  }

  // Called with mu_ held, which it releases: starts the next read when there is room for one and
  // the call is not failing, or finishes the call once no read is pending and no chunk is in
  // flight. Finishing is the last thing done with the reactor.
  void Advance(std::unique_lock<std::mutex>& lock) {
    if (!error_.ok() && read_ == Reading::kIdle) read_ = Reading::kEnded;  // stop asking for chunks
    if (read_ == Reading::kIdle && queued_ == 0 && in_flight_ < kInFlight) {
      read_ = Reading::kPending;
      watched_.WaitingOnPeer(parts_.watchdog->NowMs());
      lock.unlock();
      StartRead(&chunk_);  // chunk_ is touched again only in OnReadDone
      return;
    }
    if (read_ != Reading::kEnded || in_flight_ > 0 || finished_) {
      lock.unlock();
      return;
    }
    finished_ = true;
    const absl::Status result = Result();  // still under mu_, as everything but Finish itself
    parts_.watchdog->Remove(&watched_);
    parts_.streams->Leave(caller_);
    lock.unlock();
    Finish(ToGrpc(result));
  }

  // The call's answer, once nothing is outstanding: the first error, or what the session still lacks.
  absl::Status Result() {
    if (watched_.dropped_idle()) {
      return absl::DeadlineExceededError(absl::StrCat("no chunk arrived for ", parts_.watchdog->idle_ms() / 1000,
                                                      " s; the stream was dropped (push again: nothing stored is lost)"));
    }
    if (!error_.ok()) return error_;
    if (session_.empty()) return absl::InvalidArgumentError("no chunk was sent");
    try {
      absl::StatusOr<v1::UploadStatus> status = parts_.coordinator->QueryMissing(who_, session_);
      if (status.ok()) *response_ = *status;
      return status.status();
    } catch (const std::exception& e) {
      return HandlerFailed(ctx_, e.what());
    }
  }

  // Every chunk is authorized again: a revocation (or a certificate replaced by re-enrollment)
  // takes effect in the middle of an open stream, not at its next call.
  absl::StatusOr<v1::UploadStatus> Store(const v1::UploadChunk& chunk) {
    try {
      absl::StatusOr<PeerIdentity> again = parts_.coordinator->Authenticate(pem_);
      if (!again.ok()) return again.status();
      return parts_.coordinator->PutChunk(who_, chunk);
    } catch (const std::exception& e) {
      return HandlerFailed(ctx_, e.what());
    }
  }

  const ServiceParts parts_;
  CallbackServerContext* const ctx_;
  v1::UploadStatus* const response_;
  WatchedStream watched_;
  std::string caller_;  // role/id from the certificate: its share of slots and streams; set once
  v1::UploadChunk chunk_;  // the read buffer gRPC fills
  std::mutex mu_;          // guards what follows
  PeerIdentity who_;       // set by Start() before the first read
  std::string pem_;
  std::string session_;
  Reading read_ = Reading::kPending;
  int in_flight_ = 0;  // chunks received and not yet stored
  int queued_ = 0;     // of those, waiting for a slot
  bool finished_ = false;
  absl::Status error_;
};

// Server-streaming download of [offset, offset + length). The blob is read a manifest chunk at a
// time (≤ 8 MiB, holding a chunk slot), checked against its SHA-256 in the manifest, and sent in
// messages of 1 MiB (clients verify whole chunks as the bytes add up); a stored copy that no longer
// matches is never sent (Coordinator::ReadChunk). gRPC keeps its own copy of a message until the
// socket has taken it: small messages keep that copy small with many downloads at once, at no cost
// in speed (measured, docs/PERFORMANCE.md). While a chunk is being sent, the next one is read and
// checked on the work queue (with a slot of its own), so the hash is not paid between chunks.
//
// Outstanding work, all recorded under mu_: at most one write the client must take (writing_) and
// at most one chunk read ahead (ahead_ == kReading, from the slot request until the read is done).
// The call ends (FinishCall) only from the thread that finds neither outstanding, once done_ says
// it must; whichever finishes last ends it.
constexpr uint64_t kDownloadMessageBytes = 1 << 20;

class DownloadReactor : public grpc::ServerWriteReactor<v1::DataChunk> {
 public:
  DownloadReactor(const ServiceParts& parts, CallbackServerContext* ctx, const v1::DownloadRequest* request)
      : parts_(parts), ctx_(ctx), watched_(ctx), sha256_(request->sha256()), offset_(request->offset()) {
    absl::StatusOr<std::string> caller = CallerOf(ctx);
    if (caller.ok() && !parts_.streams->TryEnter(*caller)) {
      caller = TooManyInFlight("transfer streams", *caller, parts_.streams->per_key());
    }
    if (!caller.ok()) {
      Finish(ToGrpc(caller.status()));
      return;
    }
    caller_ = *caller;
    parts_.watchdog->Add(&watched_);
    const uint64_t length = request->length();
    parts_.work->Post([this, length] {
      absl::StatusOr<bool> reading;
      try {
        reading = Start(length);
      } catch (const std::exception& e) {
        reading = HandlerFailed(ctx_, e.what());
      }
      if (!reading.ok() || !*reading) FinishCall(reading.status());
    });
  }
  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    watched_.PeerAnswered();
    std::string().swap(*message_.mutable_data());  // sent: gRPC has its own copy
    if (!ok) {
      parts_.slots->Release(caller_);
      std::string().swap(chunk_);
      End(lock, watched_.dropped_idle() ? absl::DeadlineExceededError(absl::StrCat(
                                              "the download was not read for ", parts_.watchdog->idle_ms() / 1000,
                                              " s and was dropped (run the command again: it resumes)"))
                                        : absl::UnavailableError("the client went away"));
      return;
    }
    if (pos_ < stop_) {  // the rest of this chunk: a copy of at most 1 MiB, then the write
      SendNext(lock);
      return;
    }
    std::string().swap(chunk_);
    parts_.slots->Release(caller_);
    if (offset_ >= end_) {
      End(lock, absl::OkStatus());
      return;
    }
    if (ahead_ == Ahead::kReading) {  // the read ahead sends it when it is done
      wanted_ = true;
      return;
    }
    if (ahead_ == Ahead::kNone) {  // cannot happen: SendAhead reads ahead whenever bytes are left
      End(lock, absl::InternalError("download: no chunk read ahead with bytes left to send"));
      return;
    }
    SendAhead(lock);
  }
  void OnDone() override {
    { std::lock_guard<std::mutex> lock(mu_); }
    delete this;
  }

 private:
  enum class Ahead { kNone, kReading, kReady };

  // On the work queue: who may read what, then the first chunk. True when a chunk read was queued
  // (the call goes on); false when there is nothing to send.
  absl::StatusOr<bool> Start(uint64_t length) {
    absl::StatusOr<PeerIdentity> who = Authorize(parts_.coordinator, ctx_, "", &pem_);
    if (!who.ok()) return who.status();
    // May the caller read it? Asked first, so that the answer says nothing about other blobs.
    if (absl::StatusOr<std::string> probe = parts_.coordinator->ReadBlob(*who, sha256_, 0, 0); !probe.ok()) return probe.status();
    absl::StatusOr<ChunkLayout> layout = parts_.coordinator->blobs().Manifest(sha256_);
    if (!layout.ok()) return layout.status();
    std::lock_guard<std::mutex> lock(mu_);
    who_ = *who;
    layout_ = *std::move(layout);
    if (offset_ > layout_.size) {
      return absl::OutOfRangeError(absl::StrCat("offset ", offset_, " is past the blob's ", layout_.size, " bytes"));
    }
    end_ = length == 0 || length > layout_.size - offset_ ? layout_.size : offset_ + length;
    if (offset_ == end_) return false;
    ahead_index_ = offset_ / layout_.chunk_size;
    ahead_ = Ahead::kReading;
    wanted_ = true;
    parts_.slots->Acquire(caller_, [this] { ReadAhead(); });
    return true;
  }

  // On the work queue, holding a slot: reads and verifies chunk ahead_index_ (the caller's
  // certificate checked again, every chunk, as uploads do), then sends it if it is wanted already.
  void ReadAhead() {
    std::unique_lock<std::mutex> lock(mu_);
    if (done_) {  // the call is ending: this read is not needed
      parts_.slots->Release(caller_);
      ahead_ = Ahead::kNone;
      if (!writing_) {
        lock.unlock();
        FinishCall(end_status_);
      }
      return;
    }
    const uint64_t index = ahead_index_;
    const PeerIdentity who = who_;
    const std::string pem = pem_;
    const ChunkLayout& layout = layout_;  // fixed since Start
    lock.unlock();
    absl::StatusOr<std::string> data;
    try {
      absl::StatusOr<PeerIdentity> again = parts_.coordinator->Authenticate(pem);
      data = again.ok() ? parts_.coordinator->ReadChunk(who, layout, index) : absl::StatusOr<std::string>(again.status());
    } catch (const std::exception& e) {
      data = HandlerFailed(ctx_, e.what());
    }
    lock.lock();
    ahead_ = Ahead::kReady;
    ahead_data_ = std::move(data);
    if (done_) {  // ended while reading
      parts_.slots->Release(caller_);
      ahead_ = Ahead::kNone;
      ahead_data_ = std::string();
      if (!writing_) {
        lock.unlock();
        FinishCall(end_status_);
      }
      return;
    }
    if (wanted_) SendAhead(lock);
  }

  // Called with mu_ held, nothing outstanding but the ready chunk read ahead, which it makes the
  // chunk being sent (its slot with it); starts the next read ahead and the first write.
  void SendAhead(std::unique_lock<std::mutex>& lock) {
    wanted_ = false;
    ahead_ = Ahead::kNone;
    absl::StatusOr<std::string> data = std::move(ahead_data_);
    ahead_data_ = std::string();
    if (!data.ok()) {
      parts_.slots->Release(caller_);
      End(lock, data.status());
      return;
    }
    const uint64_t begin = ahead_index_ * layout_.chunk_size;
    chunk_ = *std::move(data);
    pos_ = offset_ - begin;
    stop_ = std::min<uint64_t>(end_ - begin, chunk_.size());
    if (begin + chunk_.size() < end_) {
      ++ahead_index_;
      ahead_ = Ahead::kReading;
      parts_.slots->Acquire(caller_, [this] { ReadAhead(); });
    }
    SendNext(lock);
  }

  // Called with mu_ held, which it releases: writes the next piece of chunk_.
  void SendNext(std::unique_lock<std::mutex>& lock) {
    const uint64_t n = std::min<uint64_t>(kDownloadMessageBytes, stop_ - pos_);
    message_.set_offset(offset_);
    message_.set_data(chunk_.substr(pos_, n));
    pos_ += n;
    offset_ += n;
    writing_ = true;
    watched_.WaitingOnPeer(parts_.watchdog->NowMs());
    lock.unlock();
    StartWrite(&message_);  // message_ is touched again only in OnWriteDone
  }

  // Called with mu_ held and no write outstanding: the call ends with `status`, now if no chunk is
  // being read ahead, else when that read is done (ReadAhead). A ready chunk read ahead gives its
  // slot back.
  void End(std::unique_lock<std::mutex>& lock, const absl::Status& status) {
    done_ = true;
    end_status_ = status;
    if (ahead_ == Ahead::kReading) return;
    if (ahead_ == Ahead::kReady) {
      parts_.slots->Release(caller_);
      ahead_ = Ahead::kNone;
      ahead_data_ = std::string();
    }
    lock.unlock();
    FinishCall(status);
  }

  // Nothing is outstanding (the caller does not hold mu_): the call ends. The last thing done with
  // the reactor.
  void FinishCall(const absl::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      parts_.watchdog->Remove(&watched_);
      parts_.streams->Leave(caller_);
    }
    Finish(ToGrpc(status));
  }

  const ServiceParts parts_;
  CallbackServerContext* const ctx_;
  WatchedStream watched_;
  std::string caller_;
  const std::string sha256_;
  std::mutex mu_;  // guards what follows
  PeerIdentity who_;
  std::string pem_;
  ChunkLayout layout_;
  uint64_t offset_, end_ = 0;  // the next byte to send, and where to stop
  std::string chunk_;          // the verified chunk being sent
  uint64_t pos_ = 0, stop_ = 0;  // within chunk_
  v1::DataChunk message_;
  bool writing_ = false;  // a write is outstanding
  Ahead ahead_ = Ahead::kNone;
  uint64_t ahead_index_ = 0;  // the chunk read ahead (or to be)
  absl::StatusOr<std::string> ahead_data_;
  bool wanted_ = false;  // the writes wait for the chunk read ahead
  bool done_ = false;    // the call must end, with end_status_, once nothing is outstanding
  absl::Status end_status_;
};

}  // namespace

grpc::ServerReadReactor<v1::UploadChunk>* NewUploadStream(const ServiceParts& parts, CallbackServerContext* ctx,
                                                          v1::UploadStatus* response, const std::string& role) {
  return new UploadReactor(parts, ctx, response, role);
}

grpc::ServerWriteReactor<v1::DataChunk>* NewDownloadStream(const ServiceParts& parts, CallbackServerContext* ctx,
                                                           const v1::DownloadRequest* request) {
  return new DownloadReactor(parts, ctx, request);
}

}  // namespace flexfed
