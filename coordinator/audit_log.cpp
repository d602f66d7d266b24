#include "coordinator/audit_log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include <nlohmann/json.hpp>

namespace flexfed {

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (fd < 0) return absl::InternalError(absl::StrCat(path, ": cannot open the audit log: ", std::strerror(errno)));
  // A last line without its newline is an event whose append never completed (the process died
  // in the write): never acknowledged, so it is cut, and the next event starts a line of its own.
  struct stat st {};
  if (::fstat(fd, &st) == 0 && st.st_size > 0) {
    off_t end = st.st_size;
    char c = 0;
    if (::pread(fd, &c, 1, end - 1) == 1 && c != '\n') {
      char buf[4096];
      while (end > 0) {
        const off_t from = std::max<off_t>(0, end - static_cast<off_t>(sizeof buf));
        const ssize_t n = ::pread(fd, buf, static_cast<size_t>(end - from), from);
        if (n <= 0) break;
        const void* nl = ::memrchr(buf, '\n', static_cast<size_t>(n));
        if (nl != nullptr) {
          end = from + (static_cast<const char*>(nl) - buf) + 1;
          break;
        }
        end = from;
      }
      if (::ftruncate(fd, end) != 0 || ::fdatasync(fd) != 0) {
        ::close(fd);
        return absl::InternalError(absl::StrCat(path, ": cannot cut its torn last line: ", std::strerror(errno)));
      }
      std::fprintf(stderr, "%s\n",
                   nlohmann::json({{"level", "warning"}, {"event", "audit_torn_line_cut"}, {"path", path},
                                   {"bytes", static_cast<int64_t>(st.st_size - end)}}).dump().c_str());
    }
  }
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
  // The whole line or none of it: a short write (a full disk) is cut back off, so the log never
  // holds half an event and the next one starts its own line.
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return absl::InternalError(absl::StrCat(path_, ": cannot stat the audit log: ", std::strerror(errno)));
  const ssize_t n = ::write(fd_, line.data(), line.size());
  const int write_errno = errno;
  if (n != static_cast<ssize_t>(line.size())) {
    if (n > 0 && ::ftruncate(fd_, st.st_size) != 0) {
      return absl::DataLossError(absl::StrCat(path_, ": an event was cut short and cannot be removed: ", std::strerror(errno),
                                              "; the coordinator cuts it when it next starts"));
    }
    return absl::ResourceExhaustedError(absl::StrCat(path_, ": cannot append to the audit log: ",
                                                     n < 0 ? std::strerror(write_errno) : "no space left on device",
                                                     "; free space where the audit log lives"));
  }
  if (::fdatasync(fd_) != 0) {
    return absl::InternalError(absl::StrCat(path_, ": cannot make the audit log durable: ", std::strerror(errno)));
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
