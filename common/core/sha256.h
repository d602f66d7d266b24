// SHA-256 (OpenSSL EVP) of byte ranges and files, as lowercase hex.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace flexfed {

// Incremental hasher. Not thread-safe; one per stream.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(const void* data, size_t size);
  void Update(std::string_view data) { Update(data.data(), data.size()); }
  std::string HexDigest();  // finalizes; the object must not be updated afterwards

 private:
  void* ctx_;  // EVP_MD_CTX*, kept opaque so OpenSSL headers stay out of this header
};

std::string Sha256Hex(std::string_view data);
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace flexfed
