#include "common/core/identity.h"

#include <openssl/bio.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace flexfed {
namespace {

template <typename T, void (*F)(T*)>
struct Deleter {
  void operator()(T* p) const { F(p); }
};
using Bio = std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>>;
using Key = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using Cert = std::unique_ptr<X509, Deleter<X509, X509_free>>;
using Req = std::unique_ptr<X509_REQ, Deleter<X509_REQ, X509_REQ_free>>;

absl::Status OpenSslError(const std::string& what) {
  unsigned long code = ERR_get_error();
  char buf[256] = "unknown error";
  if (code != 0) ERR_error_string_n(code, buf, sizeof buf);
  ERR_clear_error();
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", buf));
}

Bio MemoryBio(const std::string& text) { return Bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size()))); }

std::string BioText(BIO* bio) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(n));
}

absl::StatusOr<Key> NewKey() {
  Key key(EVP_EC_gen("P-256"));
  if (!key) return OpenSslError("generating a P-256 key");
  return key;
}

std::string KeyPem(EVP_PKEY* key) {
  Bio bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr);
  return BioText(bio.get());
}

std::string CertPem(X509* cert) {
  Bio bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(bio.get(), cert);
  return BioText(bio.get());
}

absl::StatusOr<Cert> ParseCert(const std::string& pem) {
  Bio bio = MemoryBio(pem);
  Cert cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return OpenSslError("reading a certificate (PEM)");
  return cert;
}

absl::StatusOr<Key> ParseKey(const std::string& pem) {
  Bio bio = MemoryBio(pem);
  Key key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return OpenSslError("reading a private key (PEM)");
  return key;
}

std::string Fingerprint(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  X509_digest(cert, EVP_sha256(), md, &n);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < n; ++i) {
    out.push_back(kHex[md[i] >> 4]);
    out.push_back(kHex[md[i] & 0xf]);
  }
  return out;
}

int64_t NotAfter(X509* cert) {
  struct tm t{};
  ASN1_TIME_to_tm(X509_get0_notAfter(cert), &t);
  return static_cast<int64_t>(timegm(&t));
}

absl::Status AddExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (ext == nullptr) return OpenSslError(absl::StrCat("making extension ", value));
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  return absl::OkStatus();
}

absl::Status SetRandomSerial(X509* cert) {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof bytes) != 1) return OpenSslError("random serial");
  bytes[0] &= 0x7f;  // positive
  BIGNUM* bn = BN_bin2bn(bytes, sizeof bytes, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert));
  BN_free(bn);
  return absl::OkStatus();
}

// An unsigned v3 certificate: random serial, valid from 5 minutes ago for `days`, subject CN.
absl::StatusOr<Cert> NewCertificate(const std::string& common_name, int days) {
  Cert cert(X509_new());
  X509_set_version(cert.get(), 2);
  if (absl::Status s = SetRandomSerial(cert.get()); !s.ok()) return s;
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -300);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), static_cast<long>(days) * 86400);
  X509_NAME_add_entry_by_txt(X509_get_subject_name(cert.get()), "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1, 0);
  return cert;
}

std::string CommonName(X509_NAME* name) {
  char cn[256] = {0};
  X509_NAME_get_text_by_NID(name, NID_commonName, cn, sizeof cn);
  return cn;
}

}  // namespace

bool IsValidName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  if (!std::isalnum(static_cast<unsigned char>(name[0]))) return false;
  for (char c : name) {
    if (!(std::islower(static_cast<unsigned char>(c)) || std::isdigit(static_cast<unsigned char>(c)) || c == '-' ||
          c == '_' || c == '.')) {
      return false;
    }
  }
  return true;
}

std::string RandomHex(size_t bytes) {
  std::string raw(bytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), static_cast<int>(bytes)) != 1) std::abort();
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 0xf]);
  }
  return out;
}

absl::StatusOr<KeyAndCsr> MakeKeyAndCsr(const std::string& common_name) {
  absl::StatusOr<Key> key = NewKey();
  if (!key.ok()) return key.status();
  Req req(X509_REQ_new());
  X509_NAME* name = X509_REQ_get_subject_name(req.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(common_name.c_str()), -1,
                             -1, 0);
  X509_REQ_set_pubkey(req.get(), key->get());
  if (X509_REQ_sign(req.get(), key->get(), EVP_sha256()) <= 0) return OpenSslError("signing the CSR");
  Bio bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509_REQ(bio.get(), req.get());
  return KeyAndCsr{KeyPem(key->get()), BioText(bio.get())};
}

absl::StatusOr<std::pair<std::string, IssuedCertificate>> MakeCa(const std::string& ca_name, int days) {
  absl::StatusOr<Key> key = NewKey();
  if (!key.ok()) return key.status();
  absl::StatusOr<Cert> made = NewCertificate(ca_name, days);
  if (!made.ok()) return made.status();
  Cert cert = *std::move(made);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_set_issuer_name(cert.get(), name);
  X509_set_pubkey(cert.get(), key->get());
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE,pathlen:0"},
                            {NID_key_usage, "critical,keyCertSign,cRLSign"},
                            {NID_subject_key_identifier, "hash"}}) {
    if (absl::Status s = AddExtension(cert.get(), cert.get(), nid, value); !s.ok()) return s;
  }
  if (X509_sign(cert.get(), key->get(), EVP_sha256()) <= 0) return OpenSslError("signing the CA certificate");
  IssuedCertificate issued{CertPem(cert.get()), Fingerprint(cert.get()), NotAfter(cert.get())};
  return std::make_pair(KeyPem(key->get()), issued);
}

// The keys the CA certifies: P-256 and P-384 (what FlexFed's own clients make), RSA of 3072 bits
// or more, Ed25519. Anything weaker (RSA-1024, DSA) or unusual (other curves) is refused before a
// certificate exists, so an enrollment with such a key consumes nothing.
absl::Status CheckKeyPolicy(EVP_PKEY* key) {
  const std::string allowed = "use a P-256 or P-384 key, RSA of 3072 bits or more, or Ed25519";
  switch (EVP_PKEY_get_base_id(key)) {
    case EVP_PKEY_EC: {
      char group[64] = {0};
      size_t length = 0;
      if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &length) != 1) {
        return absl::InvalidArgumentError(absl::StrCat("the request's EC key names no standard curve; ", allowed));
      }
      const std::string curve(group, length);
      if (curve == "prime256v1" || curve == "P-256" || curve == "secp384r1" || curve == "P-384") return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat("the request's key is on curve ", curve, "; ", allowed));
    }
    case EVP_PKEY_RSA:
      if (EVP_PKEY_get_bits(key) >= 3072) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat("the request's RSA key has ", EVP_PKEY_get_bits(key), " bits; ", allowed));
    case EVP_PKEY_ED25519:
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(absl::StrCat("the request's key is ", OBJ_nid2sn(EVP_PKEY_get_base_id(key)), "; ", allowed));
  }
}

absl::StatusOr<IssuedCertificate> SignCsr(const std::string& ca_key_pem, const std::string& ca_cert_pem,
                                          const std::string& csr_pem, const std::string& id, const std::string& role,
                                          int days, const std::vector<std::string>& hosts) {
  if (!IsValidName(id)) return absl::InvalidArgumentError(absl::StrCat("'", id, "' is not a valid id ([a-z0-9-_.], up to 64)"));
  if (role != "owner" && role != "admin" && role != "server") return absl::InvalidArgumentError("role must be owner, admin or server");
  absl::StatusOr<Key> ca_key = ParseKey(ca_key_pem);
  if (!ca_key.ok()) return ca_key.status();
  absl::StatusOr<Cert> ca = ParseCert(ca_cert_pem);
  if (!ca.ok()) return ca.status();
  Bio bio = MemoryBio(csr_pem);
  Req req(PEM_read_bio_X509_REQ(bio.get(), nullptr, nullptr, nullptr));
  if (!req) return OpenSslError("reading the certificate request (PEM)");
  Key pub(X509_REQ_get_pubkey(req.get()));
  if (!pub || X509_REQ_verify(req.get(), pub.get()) != 1) {
    return absl::InvalidArgumentError("the certificate request's signature does not verify; make a new CSR");
  }
  if (absl::Status s = CheckKeyPolicy(pub.get()); !s.ok()) return s;
  if (CommonName(X509_REQ_get_subject_name(req.get())) != id) {
    return absl::InvalidArgumentError(absl::StrCat("the certificate request is for '",
                                                   CommonName(X509_REQ_get_subject_name(req.get())), "', not '", id, "'"));
  }
  absl::StatusOr<Cert> made = NewCertificate(id, days);
  if (!made.ok()) return made.status();
  Cert cert = *std::move(made);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "OU", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(role.c_str()), -1, -1, 0);
  X509_set_issuer_name(cert.get(), X509_get_subject_name(ca->get()));
  X509_set_pubkey(cert.get(), pub.get());
  std::string san = absl::StrCat("URI:flexfed://", role, "/", id);
  for (const std::string& host : hosts) {
    const bool ip = host.find_first_not_of("0123456789.:") == std::string::npos;
    san += absl::StrCat(ip ? ",IP:" : ",DNS:", host);
  }
  for (auto [nid, value] : {std::pair<int, std::string>{NID_basic_constraints, "critical,CA:FALSE"},
                            {NID_key_usage, "critical,digitalSignature,keyEncipherment"},
                            {NID_ext_key_usage, role == "server" ? "serverAuth" : "clientAuth"},
                            {NID_subject_alt_name, san},
                            {NID_authority_key_identifier, "keyid"}}) {
    if (absl::Status s = AddExtension(cert.get(), ca->get(), nid, value); !s.ok()) return s;
  }
  if (X509_sign(cert.get(), ca_key->get(), EVP_sha256()) <= 0) return OpenSslError("signing the certificate");
  return IssuedCertificate{CertPem(cert.get()), Fingerprint(cert.get()), NotAfter(cert.get())};
}

absl::StatusOr<PeerIdentity> ReadIdentity(const std::string& certificate_pem) {
  absl::StatusOr<Cert> cert = ParseCert(certificate_pem);
  if (!cert.ok()) return cert.status();
  GENERAL_NAMES* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert->get(), NID_subject_alt_name, nullptr, nullptr));
  std::string uri;
  for (int i = 0; names != nullptr && i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
    if (n->type == GEN_URI) {
      const ASN1_IA5STRING* s = n->d.uniformResourceIdentifier;
      std::string value(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)), static_cast<size_t>(ASN1_STRING_length(s)));
      if (value.rfind("flexfed://", 0) == 0) uri = value;
    }
  }
  GENERAL_NAMES_free(names);
  const std::string rest = uri.substr(std::min(uri.size(), std::string("flexfed://").size()));
  const size_t slash = rest.find('/');
  if (uri.empty() || slash == std::string::npos) {
    return absl::PermissionDeniedError("the certificate carries no FlexFed identity (SAN URI flexfed://<role>/<id>)");
  }
  PeerIdentity id{rest.substr(slash + 1), rest.substr(0, slash), Fingerprint(cert->get()), NotAfter(cert->get())};
  if (!IsValidName(id.id) || (id.role != "owner" && id.role != "admin" && id.role != "server")) {
    return absl::PermissionDeniedError("the certificate's FlexFed identity is malformed");
  }
  if (CommonName(X509_get_subject_name(cert->get())) != id.id) {
    return absl::PermissionDeniedError("the certificate's subject and SAN name different ids");
  }
  return id;
}

absl::StatusOr<std::string> CertificateFingerprint(const std::string& certificate_pem) {
  absl::StatusOr<Cert> cert = ParseCert(certificate_pem);
  if (!cert.ok()) return cert.status();
  return Fingerprint(cert->get());
}

}  // namespace flexfed
