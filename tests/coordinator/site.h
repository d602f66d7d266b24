// A coordinator site for tests: a CA, a Coordinator on a temporary data directory with an
// injected clock, a published `test` anchor, and helpers to enroll owners and make modules.
// Torch-free, as the coordinator is: anchors and modules are written as safetensors bytes
// (common/core/safetensors.h), so these tests also run in the sanitizer builds (docs/BUILD.md).
#pragma once

#include <catch2/catch.hpp>
#include <openssl/dsa.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <random>

#include "common/core/anchor_manifest.h"
#include "common/core/expert_module.h"
#include "common/core/file_util.h"
#include "common/core/identity.h"
#include "common/core/safetensors.h"
#include "common/core/sha256.h"
#include "coordinator/coordinator.h"
#include "tests/temp_dir.h"

namespace flexfed::testing {

namespace fs = std::filesystem;

inline constexpr uint64_t kChunk = 64 << 10;

inline v1::Manifest ManifestOf(const std::string& path) {
  ChunkLayout l = ValueOrDie(LayoutOfFile(path, kChunk));
  v1::Manifest m;
  m.mutable_blob()->set_sha256(l.sha256);
  m.mutable_blob()->set_size(l.size);
  m.set_chunk_size(l.chunk_size);
  for (uint64_t i = 0; i < l.chunk_sha256.size(); ++i) {
    m.add_chunks()->set_index(i);
    m.mutable_chunks(static_cast<int>(i))->set_sha256(l.chunk_sha256[i]);
    m.mutable_chunks(static_cast<int>(i))->set_size(l.ChunkBytes(i));
  }
  return m;
}

// One chunk of `path` for a session, as the client sends it.
inline v1::UploadChunk ChunkOf(const std::string& path, const std::string& session, uint64_t index) {
  const std::string bytes = ValueOrDie(ReadFile(path));
  const v1::Manifest m = ManifestOf(path);
  v1::UploadChunk c;
  c.set_session_id(session);
  c.set_index(index);
  c.set_data(bytes.substr(index * kChunk, m.chunks(static_cast<int>(index)).size()));
  c.set_sha256(m.chunks(static_cast<int>(index)).sha256());
  return c;
}

// A CSR for `cn` with a key of `kind` (rsa1024, rsa3072, dsa1024, p256, p384, secp256k1,
// ed25519), made as any OpenSSL-based client would make it, for tests of the CA's key policy.
inline std::string CsrWithKey(const std::string& kind, const std::string& cn) {
  EVP_PKEY* key = nullptr;
  if (kind == "rsa1024" || kind == "rsa3072") {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", static_cast<size_t>(kind == "rsa1024" ? 1024 : 3072));
  } else if (kind == "p256" || kind == "p384" || kind == "secp256k1") {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", kind == "p256" ? "P-256" : kind == "p384" ? "P-384" : "secp256k1");
  } else if (kind == "ed25519") {
    key = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
  } else if (kind == "dsa1024") {
    EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(nullptr, "DSA", nullptr);
    EVP_PKEY* params = nullptr;
    REQUIRE(EVP_PKEY_paramgen_init(pctx) == 1);
    REQUIRE(EVP_PKEY_CTX_set_dsa_paramgen_bits(pctx, 1024) == 1);
    REQUIRE(EVP_PKEY_CTX_set_dsa_paramgen_q_bits(pctx, 160) == 1);
    REQUIRE(EVP_PKEY_paramgen(pctx, &params) == 1);
    EVP_PKEY_CTX_free(pctx);
    EVP_PKEY_CTX* kctx = EVP_PKEY_CTX_new(params, nullptr);
    REQUIRE(EVP_PKEY_keygen_init(kctx) == 1);
    REQUIRE(EVP_PKEY_keygen(kctx, &key) == 1);
    EVP_PKEY_CTX_free(kctx);
    EVP_PKEY_free(params);
  }
  REQUIRE(key != nullptr);
  X509_REQ* req = X509_REQ_new();
  X509_NAME_add_entry_by_txt(X509_REQ_get_subject_name(req), "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(cn.c_str()),
                             -1, -1, 0);
  X509_REQ_set_pubkey(req, key);
  REQUIRE(X509_REQ_sign(req, key, kind == "ed25519" ? nullptr : EVP_sha256()) > 0);
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509_REQ(bio, req);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(n));
  BIO_free(bio);
  X509_REQ_free(req);
  EVP_PKEY_free(key);
  return pem;
}

// Sends the chunks of the file at `path` that a begun upload reports missing.
inline absl::Status SendMissing(Coordinator& c, const PeerIdentity& who, const v1::UploadStatus& begun, const std::string& path) {
  const v1::Manifest m = ManifestOf(path);
  const std::string bytes = ValueOrDie(ReadFile(path));
  for (uint64_t i : begun.missing()) {
    v1::UploadChunk chunk;
    chunk.set_session_id(begun.session_id());
    chunk.set_index(i);
    chunk.set_data(bytes.substr(i * kChunk, m.chunks(static_cast<int>(i)).size()));
    chunk.set_sha256(m.chunks(static_cast<int>(i)).sha256());
    if (absl::StatusOr<v1::UploadStatus> s = c.PutChunk(who, chunk); !s.ok()) return s.status();
  }
  return absl::OkStatus();
}

// Uploads a file chunk by chunk (only the missing ones) and commits.
inline absl::StatusOr<v1::CommitUploadResponse> Upload(Coordinator& c, const PeerIdentity& who, const std::string& expert_id,
                                                       const std::string& path) {
  absl::StatusOr<v1::UploadStatus> status = c.BeginUpload(who, expert_id, ManifestOf(path));
  if (!status.ok()) return status.status();
  if (absl::Status s = SendMissing(c, who, *status, path); !s.ok()) return s;
  return c.CommitUpload(who, status->session_id());
}

// The tensors of a safetensors file as bytes, for tests that write files a hostile owner would.
struct RawTensor {
  Dtype dtype = Dtype::kF32;
  std::vector<int64_t> shape;
  std::string bytes;  // little-endian elements, row-major

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  // Element i of an F32 tensor.
  void SetF32(int64_t i, float v) { std::memcpy(bytes.data() + 4 * i, &v, 4); }
  float F32(int64_t i) const {
    float v;
    std::memcpy(&v, bytes.data() + 4 * i, 4);
    return v;
  }
  // F32 → BF16 (the upper half of each element).
  void ToBf16() {
    std::string out(bytes.size() / 2, '\0');
    for (size_t i = 0; i < bytes.size() / 4; ++i) std::memcpy(out.data() + 2 * i, bytes.data() + 4 * i + 2, 2);
    bytes = std::move(out);
    dtype = Dtype::kBF16;
  }
  static RawTensor Zeros(Dtype dtype, std::vector<int64_t> shape) {
    RawTensor t{dtype, std::move(shape), ""};
    t.bytes.assign(static_cast<size_t>(t.numel()) * DtypeSize(dtype), '\0');
    return t;
  }
  // Seeded normal values times `scale`, as F32.
  static RawTensor Random(std::vector<int64_t> shape, std::mt19937_64& rng, float scale = 1.0f) {
    RawTensor t = Zeros(Dtype::kF32, std::move(shape));
    std::normal_distribution<float> normal;
    for (int64_t i = 0; i < t.numel(); ++i) t.SetF32(i, scale * normal(rng));
    return t;
  }
};
using RawTensors = std::map<std::string, RawTensor>;

inline absl::Status WriteRawSafetensors(const std::string& path, const RawTensors& tensors,
                                        const std::map<std::string, std::string>& metadata) {
  std::vector<TensorInfo> infos;
  for (const auto& [name, t] : tensors) infos.push_back({name, t.dtype, t.shape, 0, 0});
  absl::StatusOr<std::string> header = BuildSafetensorsHeader(infos, metadata);
  if (!header.ok()) return header.status();
  std::string file = *header;
  for (const TensorInfo& info : infos) file += tensors.at(info.name).bytes;  // in the header's data order
  return WriteFileAtomically(path, file);
}

inline absl::StatusOr<std::pair<RawTensors, std::map<std::string, std::string>>> ReadRawSafetensors(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFile(path);
  if (!bytes.ok()) return bytes.status();
  absl::StatusOr<SafetensorsLayout> layout = ParseSafetensors(path, reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size());
  if (!layout.ok()) return layout.status();
  RawTensors out;
  for (const TensorInfo& t : layout->tensors) {
    out[t.name] = {t.dtype, t.shape, bytes->substr(layout->data_offset + t.begin, t.end - t.begin)};
  }
  return std::make_pair(std::move(out), layout->metadata);
}

inline std::string ModuleTensorName(int64_t layer, const std::string& what) {
  return "layers." + std::to_string(layer) + "." + what;
}

struct Site {
  TempDir dir;
  std::unique_ptr<Coordinator> coordinator;
  std::string ca_key, ca_cert, anchor_dir, anchor_id;
  PeerIdentity admin{"ops", "admin", std::string(64, 'a'), 0};
  int64_t now = 1'800'000'000;  // the coordinator's clock: tests move it by hand
  ModelConfig config;
  PrivacyPolicy policy;  // the operator's; takes effect at the next Reopen()
  std::mt19937_64 rng{20261207};

  Site() {
    auto [key, ca] = ValueOrDie(MakeCa("test CA", 30));
    ca_key = key;
    ca_cert = ca.certificate_pem;
    coordinator = ValueOrDie(Coordinator::Open(Options()));
    // An anchor of the `test` shape: its config, dense weights and r_pub, published file by file.
    config = ValueOrDie(ModelConfig::Preset("test"));
    anchor_dir = dir / "anchor";
    fs::create_directories(anchor_dir);
    REQUIRE(WriteFileAtomically(anchor_dir + "/config.json", config.ToJson().dump(2)).ok());
    const int64_t h = config.hidden_size, f = config.intermediate_size;
    RawTensors weights = {{"model.embed_tokens.weight", RawTensor::Random({config.vocab_size, h}, rng, 0.02f)},
                          {"model.norm.weight", RawTensor::Random({h}, rng)}};
    RawTensors pub;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.0.";
      weights[p + "gate_proj.weight"] = RawTensor::Random({f, h}, rng, 0.02f);
      weights[p + "up_proj.weight"] = RawTensor::Random({f, h}, rng, 0.02f);
      weights[p + "down_proj.weight"] = RawTensor::Random({h, f}, rng, 0.02f);
      pub[ModuleTensorName(l, "router.weight")] = RawTensor::Random({h}, rng);
    }
    REQUIRE(WriteRawSafetensors(anchor_dir + "/model.safetensors", weights, {}).ok());
    REQUIRE(WriteRawSafetensors(anchor_dir + "/router_pub.safetensors", pub, {}).ok());
    v1::PublishAnchorRequest publish;
    for (const auto& entry : fs::directory_iterator(anchor_dir)) {
      v1::CommitUploadResponse r = ValueOrDie(Upload(*coordinator, admin, "", entry.path().string()));
      REQUIRE(r.rejection().empty());
      v1::AnchorFile* file = publish.add_files();
      file->set_name(entry.path().filename().string());
      file->mutable_blob()->set_sha256(ValueOrDie(Sha256File(entry.path().string())));
      file->mutable_blob()->set_size(fs::file_size(entry.path()));
    }
    anchor_id = ValueOrDie(coordinator->PublishAnchor(admin, publish)).anchor_id();
  }

  CoordinatorOptions Options() {
    return {dir / "coordinator", ca_key, ca_cert, 30, 3600, [this] { return now; }, policy};
  }

  // A restart: the coordinator closed and opened again on the same data directory.
  void Reopen() {
    coordinator.reset();
    coordinator = ValueOrDie(Coordinator::Open(Options()));
  }

  // Adds and enrolls an owner; returns its authenticated identity and certificate (its private
  // key is left in `keys[owner]`).
  std::map<std::string, std::string> keys;
  std::pair<PeerIdentity, std::string> Enroll(const std::string& owner) {
    v1::AddOwnerRequest add;
    add.set_owner_id(owner);
    const std::string token = ValueOrDie(coordinator->AddOwner(admin, add)).token();
    KeyAndCsr key = ValueOrDie(MakeKeyAndCsr(owner));
    keys[owner] = key.key_pem;
    v1::EnrollRequest e;
    e.set_owner_id(owner);
    e.set_token(token);
    e.set_csr_pem(key.csr_pem);
    const std::string cert = ValueOrDie(coordinator->Enroll(e)).certificate_pem();
    return {ValueOrDie(coordinator->Authenticate(cert)), cert};
  }

  std::string Register(const std::string& owner, const std::string& name) {
    v1::RegisterExpertRequest r;
    r.set_owner_id(owner);
    r.set_name(name);
    return ValueOrDie(coordinator->RegisterExpert(admin, r)).expert_id();
  }

  // A valid module for this anchor (every tensor of the allow-list, seeded random values, a
  // negative bias); `edit` may spoil it first.
  using ModuleEdit = std::function<void(RawTensors&, ExpertModuleMetadata&)>;
  std::string Module(const std::string& name, const ModuleEdit& edit = {}) {
    RawTensors t;
    for (const AllowedTensor& a : ExpertModuleAllowList(config, Dtype::kF32, /*with_bias=*/true)) {
      t[a.name] = RawTensor::Random(a.shape, rng, a.shape.size() == 2 ? 0.02f : 1.0f);
    }
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) t[ModuleTensorName(l, "router.bias")].SetF32(0, -0.5f);
    ExpertModuleMetadata m{anchor_id, ConfigHash(config), "acme", name, "arithmetic", 1000, "anchor"};
    if (edit) edit(t, m);
    std::map<std::string, std::string> meta = {
        {"format", kExpertModuleFormat}, {"format_version", kExpertModuleVersion},
        {"anchor_sha256", m.anchor_sha256}, {"config_hash", m.config_hash},
        {"owner", m.owner}, {"expert_name", m.expert_name},
        {"domain", m.domain}, {"tokens_trained", std::to_string(m.tokens_trained)},
        {"router_init", m.router_init}};
    if (!m.privacy.empty()) meta["privacy"] = m.privacy;
    const std::string path = dir / (name + ".safetensors");
    REQUIRE(WriteRawSafetensors(path, t, meta).ok());
    return path;
  }
};

}  // namespace flexfed::testing
