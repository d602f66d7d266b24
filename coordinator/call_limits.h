// What bounds a caller's calls besides memory (coordinator/work_queue.h ChunkSlots): how many it
// may have in flight at once (InFlightLimit: transfer streams and unary calls per caller,
// enrollments in all), and how long a stream may wait on its peer without progress
// (StreamWatchdog). docs/PROTOCOL.md, "Limits".
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>

namespace flexfed {

// Calls in flight per key (a caller's "role/id", or one key for all enrollments). Thread-safe.
class InFlightLimit {
 public:
  explicit InFlightLimit(int per_key) : per_key_(per_key) {}
  // Counts a call for `key`; false (and nothing counted) when `key` already has per_key.
  bool TryEnter(const std::string& key);
  void Leave(const std::string& key);
  int InFlight(const std::string& key);
  int per_key() const { return per_key_; }

 private:
  const int per_key_;
  std::mutex mu_;
  std::map<std::string, int> open_;
};

// A stream the watchdog watches: it says when it started waiting on its peer (a read the client
// must fill, a write the client must take) and stops saying so when the peer answered.
class WatchedStream {
 public:
  explicit WatchedStream(grpc::CallbackServerContext* ctx) : ctx_(ctx) {}
  void WaitingOnPeer(int64_t now_ms) { waiting_since_ms_.store(now_ms, std::memory_order_relaxed); }
  void PeerAnswered() { waiting_since_ms_.store(0, std::memory_order_relaxed); }
  // Whether the watchdog cancelled the call (its answer then says why).
  bool dropped_idle() const { return dropped_.load(); }

 private:
  friend class StreamWatchdog;
  grpc::CallbackServerContext* const ctx_;
  std::atomic<int64_t> waiting_since_ms_{0};  // 0: not waiting on the peer
  std::atomic<bool> dropped_{false};
};

// Cancels every watched stream that has waited on its peer for longer than `idle_ms`: its pending
// read or write then ends, the stream's reactor finishes as on a broken connection, and whatever it
// held (chunk slots, its place in the caller's InFlightLimit) is freed. Keepalive pings only find
// dead connections; this finds live peers that stopped sending or reading. A thread checks every
// idle_ms / 4 (at most every second).
class StreamWatchdog {
 public:
  // `clock`: milliseconds on a monotonic clock (tests inject one); empty = steady_clock.
  StreamWatchdog(int64_t idle_ms, std::function<int64_t()> clock);
  ~StreamWatchdog();
  StreamWatchdog(const StreamWatchdog&) = delete;
  StreamWatchdog& operator=(const StreamWatchdog&) = delete;

  int64_t NowMs() const { return clock_(); }
  int64_t idle_ms() const { return idle_ms_; }
  void Add(WatchedStream* stream);
  // After Remove returns, the watchdog never touches `stream` or its call again: a reactor removes
  // itself before it calls Finish.
  void Remove(WatchedStream* stream);
  int64_t dropped() const { return dropped_.load(); }

 private:
  void Run();
  const int64_t idle_ms_;
  const std::function<int64_t()> clock_;
  std::mutex mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::set<WatchedStream*> streams_;
  std::atomic<int64_t> dropped_{0};
  std::thread thread_;  // last: started once the rest is ready
};

}  // namespace flexfed
