// The audit log: one JSON object per line, appended and fsynced before the action's reply, so an
// operator can always tell who did what (docs/ARCHITECTURE.md §6). Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

struct AuditEvent {
  std::string actor_id;           // owner id, admin name, or "-" before authentication
  std::string actor_fingerprint;  // SHA-256 of the caller's certificate, "" when none
  std::string action;             // e.g. "owner.add", "upload.commit"
  std::map<std::string, std::string> objects;  // what it touched: ids and hashes
  std::string result;             // "ok", or the error / rejection reason
};

class AuditLog {
 public:
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(const std::string& path);
  ~AuditLog();
  // Appends the event with an id and time; returns the id.
  absl::StatusOr<std::string> Append(const AuditEvent& event);
  // The last `n` lines, oldest first.
  // Up to `n` events, newest last, after skipping the `skip` newest; each cut to kMaxEventBytes
  // (marked) and all together within kMaxPageBytes (the oldest left out). `more`: older ones exist.
  static constexpr size_t kMaxEventBytes = 64 << 10, kMaxPageBytes = 4 << 20;
  absl::StatusOr<std::vector<std::string>> Tail(size_t n, size_t skip = 0, bool* more = nullptr);

 private:
  AuditLog(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::mutex mu_;
  std::string path_;
  int fd_;
  uint64_t sequence_ = 0;
};

}  // namespace flexfed
