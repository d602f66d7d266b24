// Files done carefully: atomic replacement (temp → fsync → rename → fsync dir) and mappings.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace flexfed {

// Writes a file that appears under its final name only once complete and durable. Until Commit()
// the data goes to a temporary file beside the target; destroying an uncommitted AtomicFile
// removes the temporary, so a failure or a crash never leaves a half-written target.
// Not thread-safe.
class AtomicFile {
 public:
  static absl::StatusOr<std::unique_ptr<AtomicFile>> Create(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  absl::Status Write(const void* data, size_t size);
  absl::Status Write(std::string_view data) { return Write(data.data(), data.size()); }
  absl::Status Commit();  // fsync, rename over the target, fsync the directory

 private:
  AtomicFile(std::string path, std::string temp_path, int fd)
      : path_(std::move(path)), temp_path_(std::move(temp_path)), fd_(fd) {}
  std::string path_;
  std::string temp_path_;
  int fd_;
  bool committed_ = false;
};

absl::Status WriteFileAtomically(const std::string& path, std::string_view contents);
absl::StatusOr<std::string> ReadFile(const std::string& path);

// A private, copy-on-write mapping of a whole file: readers see the file's bytes, writes through
// the mapping never reach the file. Lives as long as the last shared_ptr to it.
// Lets the kernel take back the pages of [data, data + size) once a streaming reader is done with
// them (a writer that copied a tensor out, a check that read it): they leave the process's resident
// set and are read from the file again if touched. Only memory inside a live MappedFile is affected,
// anything else is left alone; and MADV_PAGEOUT drops only pages still equal to the file's, never
// data. Where the kernel cannot (before Linux 5.4, or a file the process may not write), a no-op.
void ReleaseMappedPages(const void* data, uint64_t size);

class MappedFile {
 public:
  static absl::StatusOr<std::shared_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  MappedFile(std::string path, uint8_t* data, uint64_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  uint8_t* data_;
  uint64_t size_;
};

}  // namespace flexfed
