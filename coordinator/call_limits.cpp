#include "coordinator/call_limits.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include <nlohmann/json.hpp>

namespace flexfed {

bool InFlightLimit::TryEnter(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  int& open = open_[key];
  if (open >= per_key_) return false;
  ++open;
  return true;
}

void InFlightLimit::Leave(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = open_.find(key);
  if (it != open_.end() && --it->second <= 0) open_.erase(it);
}

int InFlightLimit::InFlight(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = open_.find(key);
  return it == open_.end() ? 0 : it->second;
}

namespace {

int64_t SteadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

StreamWatchdog::StreamWatchdog(int64_t idle_ms, std::function<int64_t()> clock)
    : idle_ms_(idle_ms), clock_(clock ? std::move(clock) : SteadyMs), thread_([this] { Run(); }) {}

StreamWatchdog::~StreamWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  thread_.join();
}

void StreamWatchdog::Add(WatchedStream* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  streams_.insert(stream);
}

void StreamWatchdog::Remove(WatchedStream* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  streams_.erase(stream);
}

void StreamWatchdog::Run() {
  const auto period = std::chrono::milliseconds(std::clamp<int64_t>(idle_ms_ / 4, 1, 1000));
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_cv_.wait_for(lock, period, [this] { return stopping_; })) {
    const int64_t now = clock_();
    for (WatchedStream* s : streams_) {
      const int64_t since = s->waiting_since_ms_.load(std::memory_order_relaxed);
      if (since == 0 || now - since <= idle_ms_ || s->dropped_.exchange(true)) continue;
      ++dropped_;
      const nlohmann::json line = {{"level", "warning"}, {"event", "stream_idle"}, {"peer", s->ctx_->peer()},
                                   {"idle_ms", now - since}, {"limit_ms", idle_ms_}};
      std::fprintf(stderr, "%s\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
      s->ctx_->TryCancel();  // under mu_: the stream cannot have removed itself and finished
    }
  }
}

}  // namespace flexfed
