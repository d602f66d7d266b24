// A coordinator site for tests: a CA, a Coordinator on a temporary data directory with an
// injected clock, a published `test` anchor, and helpers to enroll owners and make modules.
#pragma once

#include <catch2/catch.hpp>

#include <filesystem>
#include <map>

#include "common/model/anchor.h"
#include "common/merge/expert_export.h"
#include "common/core/file_util.h"
#include "common/core/sha256.h"
#include "coordinator/coordinator.h"
#include "tests/test_util.h"

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

// Uploads a file chunk by chunk (only the missing ones) and commits.
inline absl::StatusOr<v1::CommitUploadResponse> Upload(Coordinator& c, const PeerIdentity& who, const std::string& expert_id,
                                                const std::string& path) {
  v1::Manifest m = ManifestOf(path);
  absl::StatusOr<v1::UploadStatus> status = c.BeginUpload(who, expert_id, m);
  if (!status.ok()) return status.status();
  const std::string bytes = ValueOrDie(ReadFile(path));
  for (uint64_t i : status->missing()) {
    v1::UploadChunk chunk;
    chunk.set_session_id(status->session_id());
    chunk.set_index(i);
    chunk.set_data(bytes.substr(i * kChunk, m.chunks(static_cast<int>(i)).size()));
    chunk.set_sha256(m.chunks(static_cast<int>(i)).sha256());
    if (absl::StatusOr<v1::UploadStatus> s = c.PutChunk(who, chunk); !s.ok()) return s.status();
  }
  return c.CommitUpload(who, status->session_id());
}

struct Site {
  TempDir dir;
  std::unique_ptr<Coordinator> coordinator;
  std::string ca_key, ca_cert, anchor_dir, anchor_id;
  PeerIdentity admin{"ops", "admin", std::string(64, 'a'), 0};
  int64_t now = 1'800'000'000;  // the coordinator's clock: tests move it by hand
  ModelConfig config;
  PrivacyPolicy policy;  // the operator's; takes effect at the next Reopen()

  Site() {
    auto [key, ca] = ValueOrDie(MakeCa("test CA", 30));
    ca_key = key;
    ca_cert = ca.certificate_pem;
    coordinator = ValueOrDie(Coordinator::Open({dir / "coordinator", ca_key, ca_cert, 30, 3600, [this] { return now; }}));
    // An anchor: a `test` model, r_pub, published file by file.
    config = ValueOrDie(ModelConfig::Preset("test"));
    anchor_dir = dir / "anchor";
    REQUIRE(ValueOrDie(FlexOlmoModel::Create(config, at::kFloat, 3)).Save(anchor_dir).ok());
    RouterEmbedding pub;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) pub.rows.push_back(at::randn({config.hidden_size}));
    REQUIRE(WriteRouterEmbedding(anchor_dir + "/router_pub.safetensors", pub).ok());
    v1::PublishAnchorRequest publish;
    for (const auto& entry : fs::directory_iterator(anchor_dir)) {
      v1::CommitUploadResponse r = ValueOrDie(Upload(*coordinator, admin, "", entry.path().string()));
      REQUIRE(r.rejection().empty());
      v1::AnchorFile* f = publish.add_files();
      f->set_name(entry.path().filename().string());
      f->mutable_blob()->set_sha256(ValueOrDie(Sha256File(entry.path().string())));
      f->mutable_blob()->set_size(fs::file_size(entry.path()));
    }
    anchor_id = ValueOrDie(coordinator->PublishAnchor(admin, publish)).anchor_id();
  }

  // A restart: the coordinator closed and opened again on the same data directory.
  void Reopen() {
    coordinator.reset();
    coordinator = ValueOrDie(Coordinator::Open({dir / "coordinator", ca_key, ca_cert, 30, 3600, [this] { return now; }, policy}));
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

  // A valid module for this anchor; `edit` may spoil it first.
  std::string Module(const std::string& name, const std::function<void(ExpertTensors&, ExpertModuleMetadata&)>& edit = {}) {
    Anchor a = ValueOrDie(LoadAnchor(anchor_dir));
    ExpertTensors t;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      const ExpertWeights& e = a.model.layers()[l].experts[0];
      t.ffn.push_back({e.gate_proj + 0.01, e.up_proj.clone(), e.down_proj.clone()});
      t.router_rows.push_back(at::randn({config.hidden_size}));
      t.router_bias.push_back(at::tensor({-0.5f}));
    }
    ExpertModuleMetadata m{a.id, ConfigHash(config), "acme", name, "arithmetic", 1000, "anchor"};
    if (edit) edit(t, m);
    const std::string path = dir / (name + ".safetensors");
    REQUIRE(WriteExpertModule(path, t, m).ok());
    return path;
  }
};


}  // namespace flexfed::testing
