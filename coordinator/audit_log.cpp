#include "coordinator/audit_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <fstream>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include <nlohmann/json.hpp>

namespace flexfed {

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (fd < 0) return absl::InternalError(absl::StrCat(path, ": cannot open the audit log"));
  return std::unique_ptr<AuditLog>(new AuditLog(path, fd));
}

AuditLog::~AuditLog() { ::close(fd_); }

absl::StatusOr<std::string> AuditLog::Append(const AuditEvent& e) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::system_clock::now();
  const int64_t micros = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count();
  // Unique across restarts: time plus a per-process random prefix and a sequence number.
  static const uint32_t process_tag = std::random_device{}();
  const std::string id = absl::StrFormat("%016x-%08x-%06d", micros, process_tag, ++sequence_);
  const std::time_t secs = static_cast<std::time_t>(micros / 1000000);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", std::gmtime(&secs));
  nlohmann::json j = {{"id", id},
                      {"time", absl::StrFormat("%s.%06dZ", when, micros % 1000000)},
                      {"actor", e.actor_id},
                      {"actor_fingerprint", e.actor_fingerprint},
                      {"action", e.action},
                      {"objects", e.objects},
                      {"result", e.result}};
  // Bytes that are not UTF-8 (a certificate's CN, a module's metadata) are replaced, never thrown on.
  const std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  if (::write(fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size()) || ::fdatasync(fd_) != 0) {
    return absl::InternalError(absl::StrCat(path_, ": cannot append to the audit log"));
  }
  return id;
}

absl::StatusOr<std::vector<std::string>> AuditLog::Tail(size_t n, size_t skip, bool* more) {
  std::lock_guard<std::mutex> lock(mu_);
  std::ifstream in(path_);
  if (!in) return absl::InternalError(absl::StrCat(path_, ": cannot read the audit log"));
  auto cut = [](std::string line) {
    if (line.size() > kMaxEventBytes) {
      const size_t dropped = line.size() - kMaxEventBytes;
      line.resize(kMaxEventBytes);
      line += absl::StrCat("...(", dropped, " more bytes cut)");
    }
    return line;
  };
  std::deque<std::string> last;  // the newest n + skip, each already cut
  size_t total = 0;
  for (std::string line; std::getline(in, line);) {
    last.push_back(cut(std::move(line)));
    ++total;
    if (last.size() > n + skip) last.pop_front();
  }
  for (size_t i = 0; i < skip && !last.empty(); ++i) last.pop_back();
  // Within the page budget, newest first.
  std::vector<std::string> page;
  size_t bytes = 0;
  for (auto it = last.rbegin(); it != last.rend() && bytes + it->size() <= kMaxPageBytes; ++it) {
    bytes += it->size();
    page.push_back(*it);
  }
  std::reverse(page.begin(), page.end());
  if (more != nullptr) *more = total > skip + page.size();
  return page;
}

}  // namespace flexfed
