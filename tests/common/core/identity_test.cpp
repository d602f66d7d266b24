// Specification of identities for mTLS (common/core/identity.h).
#include <catch2/catch.hpp>

#include "common/core/identity.h"
#include "tests/coordinator/site.h"

namespace flexfed {
namespace {

TEST_CASE("a CA signs an owner's CSR into a certificate that names the owner", "[identity]") {
  auto [ca_key, ca] = *MakeCa("FlexFed test CA", 3650);
  CHECK(ca.fingerprint_sha256.size() == 64);
  KeyAndCsr mine = *MakeKeyAndCsr("acme");
  CHECK(mine.key_pem.find("PRIVATE KEY") != std::string::npos);
  CHECK(mine.csr_pem.find("CERTIFICATE REQUEST") != std::string::npos);
  IssuedCertificate cert = *SignCsr(ca_key, ca.certificate_pem, mine.csr_pem, "acme", "owner", 365);
  PeerIdentity id = *ReadIdentity(cert.certificate_pem);
  CHECK(id.id == "acme");
  CHECK(id.role == "owner");
  CHECK(id.fingerprint_sha256 == cert.fingerprint_sha256);
  CHECK(id.not_after_unix > std::time(nullptr) + 364 * 86400);
  CHECK(*CertificateFingerprint(cert.certificate_pem) == cert.fingerprint_sha256);
}

TEST_CASE("CSRs are checked before signing", "[identity]") {
  auto [ca_key, ca] = *MakeCa("CA", 10);
  KeyAndCsr other = *MakeKeyAndCsr("someone-else");
  absl::Status s = SignCsr(ca_key, ca.certificate_pem, other.csr_pem, "acme", "owner", 10).status();
  CHECK_THAT(std::string(s.message()), Catch::Contains("'someone-else', not 'acme'"));
  std::string tampered = MakeKeyAndCsr("acme")->csr_pem;
  tampered[tampered.size() / 2] = tampered[tampered.size() / 2] == 'A' ? 'B' : 'A';
  CHECK_FALSE(SignCsr(ca_key, ca.certificate_pem, tampered, "acme", "owner", 10).ok());
  CHECK_FALSE(SignCsr(ca_key, ca.certificate_pem, MakeKeyAndCsr("Bad Name")->csr_pem, "Bad Name", "owner", 10).ok());
  CHECK_FALSE(SignCsr(ca_key, ca.certificate_pem, MakeKeyAndCsr("acme")->csr_pem, "acme", "root", 10).ok());
}

TEST_CASE("the CA certifies P-256, P-384, RSA of 3072 bits or more and Ed25519 keys only", "[identity]") {
  auto [ca_key, ca] = *MakeCa("CA", 10);
  for (const std::string kind : {"p256", "p384", "rsa3072", "ed25519"}) {
    INFO(kind);
    absl::StatusOr<IssuedCertificate> cert = SignCsr(ca_key, ca.certificate_pem, testing::CsrWithKey(kind, "acme"), "acme", "owner", 10);
    CHECK(cert.ok());
    if (cert.ok()) CHECK(ReadIdentity(cert->certificate_pem)->id == "acme");
  }
  for (const auto& [kind, why] : std::vector<std::pair<std::string, std::string>>{
           {"rsa1024", "RSA key has 1024 bits"}, {"dsa1024", "key is DSA"}, {"secp256k1", "curve secp256k1"}}) {
    INFO(kind);
    absl::Status s = SignCsr(ca_key, ca.certificate_pem, testing::CsrWithKey(kind, "acme"), "acme", "owner", 10).status();
    CHECK(absl::IsInvalidArgument(s));
    CHECK_THAT(std::string(s.message()), Catch::Contains(why) && Catch::Contains("use a P-256 or P-384 key"));
  }
}

TEST_CASE("server certificates carry their host names", "[identity]") {
  auto [ca_key, ca] = *MakeCa("CA", 10);
  IssuedCertificate cert = *SignCsr(ca_key, ca.certificate_pem, MakeKeyAndCsr("coordinator")->csr_pem, "coordinator",
                                    "server", 10, {"localhost", "127.0.0.1"});
  CHECK(ReadIdentity(cert.certificate_pem)->role == "server");
}

TEST_CASE("names are restricted to what fits URIs, paths and subjects", "[identity]") {
  CHECK(IsValidName("acme"));
  CHECK(IsValidName("hospital-7.lab_2"));
  CHECK_FALSE(IsValidName(""));
  CHECK_FALSE(IsValidName("-x"));
  CHECK_FALSE(IsValidName("ACME"));
  CHECK_FALSE(IsValidName("a/b"));
  CHECK_FALSE(IsValidName(std::string(65, 'a')));
  CHECK_FALSE(ReadIdentity("not a certificate").ok());
}

}  // namespace
}  // namespace flexfed
