// A fixed set of threads running posted tasks, oldest first. The gRPC layer (coordinator/service.h)
// hands every piece of blocking work here — hashing and writing a chunk, reading a blob, a commit's
// hashing pass, a database transaction — so that gRPC's callback threads only react to events and
// start the next operation, as its callback API requires.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
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

}  // namespace flexfed
