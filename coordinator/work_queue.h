// A fixed set of threads running posted tasks, oldest first. The gRPC layer (coordinator/service.h)
// hands every piece of blocking work here — hashing and writing a chunk, reading a blob, a commit's
// hashing pass, a database transaction — so that gRPC's callback threads only react to events and
// start the next operation, as its callback API requires.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <mutex>
#include <thread>
#include <vector>

namespace flexfed {

class WorkQueue {
 public:
  explicit WorkQueue(int threads);
  // Runs every task already posted, then joins the threads.
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Tasks must not throw.
  void Post(std::function<void()> task);
  int threads() const { return static_cast<int>(threads_.size()); }

 private:
  void Run();
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

// A bound on the chunks transfers hold in memory, whoever asks and however many streams they open:
// a stream takes a slot before it receives (or reads from disk) its next chunk and gives it back
// once the chunk is stored (or sent). A caller holds at most `per_caller` slots, so one owner's many
// streams cannot take all of them. Waiters are served in order; `then` runs on the work queue, so
// nothing ever blocks waiting for a slot.
class ChunkSlots {
 public:
  ChunkSlots(int slots, int per_caller, WorkQueue* work) : free_(slots), per_caller_(per_caller), work_(work) {}
  void Acquire(const std::string& caller, std::function<void()> then);
  void Release(const std::string& caller);
  int free_slots();

 private:
  struct Waiter {
    std::string caller;
    std::function<void()> then;
  };
  std::mutex mu_;
  int free_;
  const int per_caller_;
  WorkQueue* work_;
  std::map<std::string, int> held_;
  std::deque<Waiter> waiting_;
};

}  // namespace flexfed
