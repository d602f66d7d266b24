// Identities for mTLS (docs/ARCHITECTURE.md §5), on OpenSSL: the project CA, certificate requests
// made where the private key lives, certificates that bind an owner id (subject CN and a SAN URI
// `flexfed://<role>/<id>`), fingerprints, and reading a peer certificate back.
// Keys are ECDSA P-256. All inputs are PEM text; all failures are Status errors, never aborts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

struct KeyAndCsr {
  std::string key_pem;  // PKCS#8 private key: stays on the machine that made it
  std::string csr_pem;
};

struct IssuedCertificate {
  std::string certificate_pem;
  std::string fingerprint_sha256;  // of the DER encoding, lowercase hex
  int64_t not_after_unix = 0;
};

struct PeerIdentity {
  std::string id;    // owner id, or the admin's name
  std::string role;  // "owner" | "admin" | "server"
  std::string fingerprint_sha256;
  int64_t not_after_unix = 0;
};

// A new private key and a CSR with subject CN = `common_name`.
absl::StatusOr<KeyAndCsr> MakeKeyAndCsr(const std::string& common_name);

// A self-signed CA certificate and its key, valid for `days`.
absl::StatusOr<std::pair<std::string, IssuedCertificate>> MakeCa(const std::string& name, int days);

// Signs `csr_pem` with the CA: subject CN = id, SAN URI flexfed://<role>/<id> (and, for role
// "server", SAN DNS/IP entries from `hosts`), client or server auth usage, random serial, valid
// for `days`. Refuses a CSR whose signature does not verify or whose CN differs from `id`.
absl::StatusOr<IssuedCertificate> SignCsr(const std::string& ca_key_pem, const std::string& ca_cert_pem,
                                          const std::string& csr_pem, const std::string& id, const std::string& role,
                                          int days, const std::vector<std::string>& hosts = {});

// Reads a certificate's FlexFed identity (from its SAN URI) and fingerprint. Does not verify the
// chain: TLS did that before the certificate reached here.
absl::StatusOr<PeerIdentity> ReadIdentity(const std::string& certificate_pem);

absl::StatusOr<std::string> CertificateFingerprint(const std::string& certificate_pem);

// Owner and expert names: 1–64 of [a-z0-9-_.], starting with a letter or digit (they appear in
// URIs, paths and certificate subjects).
bool IsValidName(const std::string& name);

// `bytes` cryptographically random bytes as lowercase hex (tokens, session secrets).
std::string RandomHex(size_t bytes);

}  // namespace flexfed
