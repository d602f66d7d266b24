#include "coordinator/work_queue.h"

#include <cstdio>
#include <exception>

#include <nlohmann/json.hpp>

namespace flexfed {

WorkQueue::WorkQueue(int threads) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
}

WorkQueue::~WorkQueue() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  ready_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void WorkQueue::Post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(task));
  }
  ready_.notify_one();
}

void WorkQueue::Run() {
  while (true) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      ready_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping, and nothing left to run
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    // Tasks catch their own exceptions (handlers answer INTERNAL and log); one that escapes is
    // logged here rather than ending the process.
    try {
      task();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "{\"level\":\"error\",\"event\":\"task_exception\",\"what\":%s}\n",
                   nlohmann::json(std::string(e.what())).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } catch (...) {
      std::fprintf(stderr, "{\"level\":\"error\",\"event\":\"task_exception\",\"what\":\"unknown\"}\n");
    }
  }
}

void ChunkSlots::Acquire(const std::string& caller, std::function<void()> then) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    int& held = held_[caller];
    if (free_ == 0 || held >= per_caller_) {
      waiting_.push_back({caller, std::move(then)});
      return;
    }
    --free_;
    ++held;
  }
  work_->Post(std::move(then));
}

void ChunkSlots::Release(const std::string& caller) {
  std::function<void()> next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++free_;
    if (auto it = held_.find(caller); it != held_.end() && --it->second <= 0) held_.erase(it);
    // The oldest waiter whose caller is under its share gets the slot.
    for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
      int& held = held_[it->caller];
      if (held >= per_caller_) continue;
      --free_;
      ++held;
      next = std::move(it->then);
      waiting_.erase(it);
      break;
    }
  }
  if (next) work_->Post(std::move(next));
}

int ChunkSlots::free_slots() {
  std::lock_guard<std::mutex> lock(mu_);
  return free_;
}

}  // namespace flexfed
