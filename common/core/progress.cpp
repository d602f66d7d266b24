#include "common/core/progress.h"

#include <unistd.h>

#include <cmath>

#include "absl/strings/str_format.h"

namespace flexfed {

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s < 60) return absl::StrFormat("%ds", s);
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
}

ProgressReporter::ProgressReporter(std::FILE* out, bool plain)
    : out_(out), live_(!plain && ::isatty(::fileno(out)) == 1) {}

void ProgressReporter::Update(int64_t done, int64_t total, const std::string& fields, double eta_seconds) {
  const double pct = total > 0 ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 0.0;
  Show(absl::StrFormat("step %d/%d (%.0f%%) | %s | ETA %s", done, total, pct, fields, FormatDuration(eta_seconds)));
}

void ProgressReporter::Show(const std::string& line) {
  if (live_) {
    std::fprintf(out_, "\r\033[K%s", line.c_str());
    pending_ = true;
  } else {
    std::fprintf(out_, "%s\n", line.c_str());
  }
  std::fflush(out_);
}

void ProgressReporter::Transfer(const std::string& what, uint64_t done, uint64_t total, double seconds) {
  const double mib = 1024.0 * 1024.0;
  const double rate = seconds > 0 ? done / mib / seconds : 0.0;
  const double pct = total > 0 ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 100.0;
  const double eta = rate > 0 ? (total - done) / mib / rate : 0.0;
  Show(absl::StrFormat("%s %.1f/%.1f MiB (%.0f%%) | %.1f MiB/s | ETA %s", what, done / mib, total / mib, pct, rate,
                       FormatDuration(eta)));
}

void ProgressReporter::Line(const std::string& text) {
  if (pending_) std::fprintf(out_, "\r\033[K");
  std::fprintf(out_, "%s\n", text.c_str());
  pending_ = false;
  std::fflush(out_);
}

void ProgressReporter::Finish() {
  if (pending_) {
    std::fprintf(out_, "\n");
    std::fflush(out_);
    pending_ = false;
  }
}

}  // namespace flexfed
