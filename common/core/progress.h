// Progress of long work: a live line redrawn in place on a terminal, plain lines otherwise
// (logs, CI, pipes). Not thread-safe: one reporter per task, called from its thread.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace flexfed {

class ProgressReporter {
 public:
  // Live when `out` is a terminal and `plain` is false.
  explicit ProgressReporter(std::FILE* out = stderr, bool plain = false);
  ~ProgressReporter() { Finish(); }

  bool live() const { return live_; }
  // "step 120/1000 (12%) | <fields> | ETA 3m12s". Live: redraws the line. Plain: prints it.
  void Update(int64_t done, int64_t total, const std::string& fields, double eta_seconds);
  // "12.3/45.6 MiB (27%) | 5.1 MiB/s | ETA 6s" for a transfer `seconds` into it.
  void Transfer(const std::string& what, uint64_t done_bytes, uint64_t total_bytes, double seconds);
  // A line that stays (clears the live line first).
  void Line(const std::string& text);
  void Finish();  // ends a live line

 private:
  void Show(const std::string& line);  // redraws (live) or prints (plain) one status line
  std::FILE* out_;
  bool live_;
  bool pending_ = false;  // a live line is on screen
};

// "3m12s", "1h04m", "42s".
std::string FormatDuration(double seconds);

}  // namespace flexfed
