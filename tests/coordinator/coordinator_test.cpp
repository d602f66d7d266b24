// Specification of the coordinator's logic (coordinator/coordinator.h), in process: enrollment,
// anchors, uploads, validation and authorization. The gRPC transport is tested separately.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <limits>
#include <functional>
#include <map>
#include <optional>
#include <thread>


#include <sqlite3.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/core/anchor_manifest.h"
#include "common/core/file_util.h"
#include "common/core/release.h"
#include "common/core/sha256.h"
#include "common/core/dp_accountant.h"
#include "coordinator/audit_log.h"
#include "coordinator/coordinator.h"
#include "tests/coordinator/site.h"
#include "tests/temp_dir.h"

namespace flexfed {
namespace {

using testing::ManifestOf;
using testing::Site;
using testing::TempDir;
using testing::Upload;
using testing::ValueOrDie;
using testing::kChunk;
namespace fs = std::filesystem;

TEST_CASE("the published anchor's id is the one owners compute on their copy", "[coordinator_logic]") {
  Site site;
  CHECK(site.anchor_id == ValueOrDie(AnchorId(site.anchor_dir)));
  v1::Anchor a = ValueOrDie(site.coordinator->GetAnchor(""));
  CHECK(a.anchor_id() == site.anchor_id);
  CHECK(a.config_hash() == ConfigHash(site.config));
  CHECK(a.files_size() == 3);  // config.json, model.safetensors, router_pub.safetensors
}

TEST_CASE("an anchor's file list is checked before it is published: names inside the folder, once, real hashes", "[coordinator_logic]") {
  Site site;
  const v1::Anchor current = ValueOrDie(site.coordinator->GetAnchor(""));
  auto publish = [&](const std::function<void(v1::PublishAnchorRequest&)>& edit) {
    v1::PublishAnchorRequest r;
    for (const v1::AnchorFile& f : current.files()) *r.add_files() = f;
    edit(r);
    return site.coordinator->PublishAnchor(site.admin, r).status();
  };
  const v1::AnchorFile config = current.files(0);
  for (const std::string& name : {std::string("../config.json"), std::string("/etc/passwd"), std::string("a//b"),
                                  std::string("sub/./x"), std::string(".hidden"), std::string("dir/.git/x"),
                                  std::string("a\\b"), std::string("nul\0byte", 8), std::string(300, 'x')}) {
    INFO(name);
    absl::Status s = publish([&](v1::PublishAnchorRequest& r) {
      v1::AnchorFile* f = r.add_files();
      *f = config;
      f->set_name(name);
    });
    CHECK(absl::IsInvalidArgument(s));
    CHECK_THAT(std::string(s.message()), Catch::Matchers::Contains("plain relative paths inside the anchor directory"));
  }
  absl::Status twice = publish([&](v1::PublishAnchorRequest& r) { *r.add_files() = config; });
  CHECK(absl::IsInvalidArgument(twice));
  CHECK_THAT(std::string(twice.message()), Catch::Matchers::Contains("listed twice"));
  absl::Status upper = publish([&](v1::PublishAnchorRequest& r) {
    std::string sha = r.files(0).blob().sha256();
    std::transform(sha.begin(), sha.end(), sha.begin(), ::toupper);
    r.mutable_files(0)->mutable_blob()->set_sha256(sha);
  });
  CHECK_THAT(std::string(upper.message()), Catch::Matchers::Contains("is not a SHA-256"));
  CHECK(ValueOrDie(site.coordinator->GetAnchor("")).anchor_id() == site.anchor_id);  // nothing was published
}

TEST_CASE("an enrolled owner uploads a valid module; commit is idempotent; re-declaring resends nothing", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  CHECK(acme.id == "acme");
  CHECK(acme.role == "owner");
  const std::string expert = site.Register("acme", "math");
  const std::string module = site.Module("good");
  v1::CommitUploadResponse r = ValueOrDie(Upload(*site.coordinator, acme, expert, module));
  CHECK(r.rejection() == "");
  CHECK(r.expert().state() == v1::EXPERT_STATE_UPLOADED);
  CHECK(r.expert().module().sha256() == ValueOrDie(Sha256File(module)));
  CHECK(r.expert().tokens_trained() == 1000);
  CHECK(site.coordinator->blobs().Has(r.expert().module().sha256()));
  // The same upload again: nothing missing, and committing returns the same answer.
  v1::UploadStatus again = ValueOrDie(site.coordinator->BeginUpload(acme, expert, ManifestOf(module)));
  CHECK(again.missing_size() == 0);
  v1::CommitUploadResponse twice = ValueOrDie(site.coordinator->CommitUpload(acme, again.session_id()));
  CHECK(twice.expert().module().sha256() == r.expert().module().sha256());
  // Enabling makes it active.
  v1::SetExpertStateRequest enable;
  enable.set_expert_id(expert);
  enable.set_state(v1::EXPERT_STATE_ACTIVE);
  CHECK(ValueOrDie(site.coordinator->SetExpertState(site.admin, enable)).state() == v1::EXPERT_STATE_ACTIVE);
  // The audit log saw every step.
  std::string audit;
  const v1::TailAuditResponse tail = ValueOrDie(site.coordinator->TailAudit(100));
  for (const std::string& line : tail.events()) audit += line + "\n";
  for (const char* action : {"anchor.publish", "owner.add", "owner.enroll", "expert.register", "upload.commit", "expert.active"}) {
    CHECK_THAT(audit, Catch::Contains(action));
  }
}

TEST_CASE("an interrupted upload resumes with only the missing chunks", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string expert = site.Register("acme", "math");
  const std::string module = site.Module("m");
  v1::Manifest m = ManifestOf(module);
  REQUIRE(m.chunks_size() >= 3);
  v1::UploadStatus first = ValueOrDie(site.coordinator->BeginUpload(acme, expert, m));
  const std::string bytes = ValueOrDie(ReadFile(module));
  v1::UploadChunk c;
  c.set_session_id(first.session_id());
  c.set_index(1);
  c.set_data(bytes.substr(kChunk, kChunk));
  c.set_sha256(m.chunks(1).sha256());
  REQUIRE(site.coordinator->PutChunk(acme, c).ok());
  // The coordinator restarts: a new process on the same data directory.
  site.coordinator.reset();
  site.coordinator = ValueOrDie(Coordinator::Open({site.dir / "coordinator", site.ca_key, site.ca_cert, 30, 3600, [&site] { return site.now; }}));
  v1::UploadStatus resumed = ValueOrDie(site.coordinator->BeginUpload(acme, expert, m));
  CHECK(resumed.session_id() == first.session_id());
  CHECK(std::find(resumed.missing().begin(), resumed.missing().end(), 1u) == resumed.missing().end());
  CHECK(resumed.missing_size() == m.chunks_size() - 1);
  CHECK(absl::IsFailedPrecondition(site.coordinator->CommitUpload(acme, resumed.session_id()).status()));  // not complete
  CHECK(ValueOrDie(Upload(*site.coordinator, acme, expert, module)).rejection() == "");
}

// The anchor's config.json is read through one accessor; a store that lost it (a damaged database)
// must fail uploads with DATA_LOSS and keep the upload open for a retry, not crash (CommitModule
// dereferenced a missing file) or skip the size check (BeginUpload ignored the read's error).
TEST_CASE("an anchor whose config.json is gone from the store fails uploads with DATA_LOSS", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string math = site.Register("acme", "math");
  const std::string code = site.Register("acme", "code");
  const std::string module = site.Module("m");
  const v1::Manifest m = ManifestOf(module);
  v1::UploadStatus begun = ValueOrDie(site.coordinator->BeginUpload(acme, math, m));
  REQUIRE(testing::SendMissing(*site.coordinator, acme, begun, module).ok());
  // Damage the store behind the coordinator's back: the anchor's file list loses config.json.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open((site.dir / "coordinator/metadata.db").c_str(), &db) == SQLITE_OK);
  const std::string sql = "UPDATE anchors SET files_json = (SELECT json_group_array(value) FROM json_each(files_json) "
                          "WHERE json_extract(value, '$.name') != 'config.json')";
  CHECK(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  REQUIRE(ValueOrDie(site.coordinator->GetAnchor("")).files_size() == 2);

  const absl::Status commit = site.coordinator->CommitUpload(acme, begun.session_id()).status();
  CHECK(absl::IsDataLoss(commit));
  CHECK_THAT(std::string(commit.message()), Catch::Contains("config.json"));
  CHECK(absl::IsDataLoss(site.coordinator->BeginUpload(acme, code, m).status()));
  // Nothing was attached; the upload is not rejected.
  CHECK(ValueOrDie(site.coordinator->GetExpert(acme, math)).state() == v1::EXPERT_STATE_REGISTERED);
}

TEST_CASE("every kind of bad module is rejected with its own reason and nothing becomes visible", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string expert = site.Register("acme", "math");
  auto reject = [&](const std::string& path) {
    v1::CommitUploadResponse r = ValueOrDie(Upload(*site.coordinator, acme, expert, path));
    v1::Expert e = ValueOrDie(site.coordinator->GetExpert(acme, expert));
    CHECK(e.module().sha256().empty());  // no partial or bad expert is ever listed
    CHECK(e.state() == v1::EXPERT_STATE_REGISTERED);
    return r.rejection();
  };
  CHECK(reject(site.Module("wrong_anchor", [](testing::RawTensors&, ExpertModuleMetadata& m) { m.anchor_sha256 = std::string(64, 'f'); })) == "anchor_mismatch");
  CHECK(reject(site.Module("shape", [](testing::RawTensors& t, ExpertModuleMetadata&) { t["layers.1.up_proj.weight"] = testing::RawTensor::Zeros(Dtype::kF32, {3, 3}); })) == "shape");
  CHECK(reject(site.Module("nan", [&](testing::RawTensors& t, ExpertModuleMetadata&) { t["layers.0.down_proj.weight"].SetF32(2 * site.config.intermediate_size + 3, NAN); })) == "non_finite");
  {  // issue #13, row 8: a tokens_trained past int64 threw in std::stoll and left the upload open for good
    auto [tensors, meta] = ValueOrDie(testing::ReadRawSafetensors(site.Module("huge_tokens")));
    meta["tokens_trained"] = "99999999999999999999";
    const std::string path = site.dir / "huge_tokens2.safetensors";
    REQUIRE(testing::WriteRawSafetensors(path, tensors, meta).ok());
    CHECK(reject(path) == "metadata");
  }
  CHECK(reject(site.Module("dtype", [](testing::RawTensors& t, ExpertModuleMetadata&) { t["layers.0.gate_proj.weight"].ToBf16(); })) == "dtype");
  {
    // An extra tensor: the file is written by hand, as a malicious owner would.
    auto [tensors, meta] = ValueOrDie(testing::ReadRawSafetensors(site.Module("base")));
    tensors["model.embed_tokens.weight"] = testing::RawTensor::Zeros(Dtype::kF32, {259, 64});
    REQUIRE(testing::WriteRawSafetensors(site.dir / "extra.safetensors", tensors, meta).ok());
    CHECK(reject(site.dir / "extra.safetensors") == "unexpected_tensor");
  }
  REQUIRE(WriteFileAtomically(site.dir / "garbage.safetensors", std::string("\xff\xff\xff\xff\xff\xff\xff\x7f garbage", 16)).ok());
  CHECK(reject(site.dir / "garbage.safetensors") == "format");
  // Oversized: refused before a single chunk is accepted.
  REQUIRE(WriteFileAtomically(site.dir / "huge", std::string(8 << 20, 'x')).ok());
  absl::Status big = site.coordinator->BeginUpload(acme, expert, ManifestOf(site.dir / "huge")).status();
  CHECK_THAT(std::string(big.message()), Catch::Contains("oversized"));
  // A corrupted chunk is refused on arrival.
  const std::string module = site.Module("ok");
  v1::Manifest m = ManifestOf(module);
  v1::UploadStatus s = ValueOrDie(site.coordinator->BeginUpload(acme, expert, m));
  v1::UploadChunk c;
  c.set_session_id(s.session_id());
  c.set_index(0);
  std::string data = ValueOrDie(ReadFile(module)).substr(0, kChunk);
  data[100] ^= 1;
  c.set_data(data);
  c.set_sha256(m.chunks(0).sha256());
  CHECK_FALSE(site.coordinator->PutChunk(acme, c).ok());
  auto counters = site.coordinator->counters();
  for (const char* reason : {"anchor_mismatch", "shape", "non_finite", "dtype", "unexpected_tensor", "format", "oversized"}) {
    CHECK(counters.rejected_uploads[reason] == 1);
  }
}

// A DP record as the trainer writes it: ε from the accountant for this σ, q, steps and δ.
std::string DpRecord(double sigma, double q, int64_t steps, double delta = 1e-5, std::optional<double> claimed_epsilon = {}) {
  RdpAccountant accountant;
  accountant.Compose(q, sigma, steps);
  const double epsilon = claimed_epsilon.value_or(accountant.Epsilon(delta).epsilon);
  return absl::StrCat(R"("dp": {"noise_multiplier": )", nlohmann::json(sigma).dump(), R"(, "max_grad_norm": 1.0, "sampling_rate": )",
                      nlohmann::json(q).dump(), R"(, "expected_batch": 8, "steps": )", steps, R"(, "delta": )",
                      nlohmann::json(delta).dump(), R"(, "epsilon": )", nlohmann::json(epsilon).dump(), "}");
}

// A site whose operator asks for an extraction audit (rate ≤ 0.01) and DP-SGD (ε ≤ 8), with
// acme's expert `math`; upload(name, privacy) pushes a fresh module carrying that privacy record.
struct PolicySite {
  Site site;
  PeerIdentity acme;
  std::string expert;
  PolicySite() {
    site.policy.max_extraction = 0.01;
    site.policy.max_dp_epsilon = 8;
    site.Reopen();
    acme = site.Enroll("acme").first;
    expert = site.Register("acme", "math");
  }
  v1::CommitUploadResponse upload(const std::string& name, const std::string& privacy) {
    const std::string path = site.Module(name, [&](testing::RawTensors&, ExpertModuleMetadata& m) { m.privacy = privacy; });
    return ValueOrDie(Upload(*site.coordinator, acme, expert, path));
  }
};
constexpr char kAuditOk[] = R"("extraction": {"audited": 200, "extracted": 1, "rate": 0.005, "complete": true})";

TEST_CASE("the operator's privacy policy refuses modules without the audit or DP it asks for", "[coordinator_logic]") {
  PolicySite p;
  Site& site = p.site;
  const std::string audit_ok = kAuditOk;
  const std::string dp_ok = DpRecord(1.0, 0.01, 1000);  // ε ≈ 1
  v1::CommitUploadResponse r = p.upload("none", "");
  CHECK(r.rejection() == "privacy_policy");
  CHECK_THAT(r.message(), Catch::Contains("flexfed-owner audit"));
  r = p.upload("leaky", R"({"extraction": {"audited": 100, "extracted": 5, "rate": 0.05, "complete": true}, )" + dp_ok + "}");
  CHECK(r.rejection() == "privacy_policy");
  CHECK_THAT(r.message(), Catch::Contains("0.0500 exceeds the allowed 0.0100"));
  r = p.upload("partial", R"({"extraction": {"audited": 10, "extracted": 0, "rate": 0, "complete": false}, )" + dp_ok + "}");
  CHECK(r.rejection() == "privacy_policy");
  r = p.upload("no_dp", "{" + audit_ok + "}");
  CHECK(r.rejection() == "privacy_policy");
  CHECK_THAT(r.message(), Catch::Contains("--dp-epsilon 8"));
  r = p.upload("loose_dp", "{" + audit_ok + ", " + DpRecord(0.5, 0.05, 2000) + "}");
  CHECK(r.rejection() == "privacy_policy");
  CHECK(ValueOrDie(site.coordinator->GetExpert(p.acme, p.expert)).module().sha256().empty());  // nothing became visible
  CHECK(site.coordinator->counters().rejected_uploads["privacy_policy"] == 5);
  r = p.upload("good", "{" + audit_ok + ", " + dp_ok + "}");
  CHECK(r.rejection().empty());
  CHECK_FALSE(ValueOrDie(site.coordinator->GetExpert(p.acme, p.expert)).module().sha256().empty());

  // Without a policy the same unaudited module is accepted.
  site.policy = {};
  site.Reopen();
  CHECK(p.upload("none_again", "").rejection().empty());
}

// Issue #34 row 10: records that contradict themselves are refused, whatever the policy: ε
// recomputed by the accountant from the record's own σ, q and steps; δ bounded; and an extraction
// rate counts for a policy only from an audit of enough sequences.
TEST_CASE("forged privacy records are refused: epsilon recomputed, delta bounded, audits large enough", "[coordinator_logic]") {
  PolicySite p;
  Site& site = p.site;
  const std::string audit_ok = kAuditOk;
  struct Forgery {
    std::string name, privacy, rejection, why;
  };
  for (const Forgery& f : std::vector<Forgery>{
           {"no_noise", R"({"dp": {"noise_multiplier": 0, "max_grad_norm": 1, "sampling_rate": 0.01, "steps": 100, "delta": 1e-5,
                             "epsilon": 0.5}, )" + audit_ok + "}",
            "metadata", "has no noise"},
           {"old_shape", R"({"dp": {"epsilon": 0.5, "delta": 1e-5}, )" + audit_ok + "}", "metadata", "lacks a finite noise_multiplier"},
           {"huge_delta", "{" + DpRecord(1.0, 0.01, 1000, 0.99, 0.0) + ", " + audit_ok + "}", "metadata", "protects nothing"},
           {"understated", "{" + DpRecord(0.5, 0.05, 2000, 1e-5, 0.5) + ", " + audit_ok + "}", "metadata", "give "},
           {"tiny_audit", "{" + DpRecord(1.0, 0.01, 1000) + R"(, "extraction": {"audited": 1, "extracted": 0, "rate": 0, "complete": true}})",
            "privacy_policy", "covered 1 sequence(s); at least 100"}}) {
    INFO(f.name);
    const v1::CommitUploadResponse r = p.upload(f.name, f.privacy);
    CHECK(r.rejection() == f.rejection);
    CHECK_THAT(r.message(), Catch::Contains(f.why));
  }
  CHECK(ValueOrDie(site.coordinator->GetExpert(p.acme, p.expert)).module().sha256().empty());
  // The same settings recorded honestly pass.
  CHECK(p.upload("honest", "{" + DpRecord(1.0, 0.01, 1000) + ", " + audit_ok + "}").rejection().empty());
}

// Issue #34 row 9: a refusal is tied to the policy it was made under; the same bytes pushed after
// the operator changed the policy are checked under the new one, not refused from the record.
TEST_CASE("a module refused under a privacy policy is checked again once the policy changes", "[coordinator_logic]") {
  Site site;
  site.policy.max_dp_epsilon = 8;
  site.Reopen();
  auto [acme, cert] = site.Enroll("acme");
  const std::string expert = site.Register("acme", "math");
  const std::string module = site.Module("plain");  // no privacy record at all
  CHECK(ValueOrDie(Upload(*site.coordinator, acme, expert, module)).rejection() == "privacy_policy");
  // The same policy: the recorded refusal, no second validation.
  CHECK(ValueOrDie(Upload(*site.coordinator, acme, expert, module)).rejection() == "privacy_policy");
  CHECK(site.coordinator->counters().rejected_uploads["privacy_policy"] == 1);
  // The policy lifted: the very same bytes are accepted.
  site.policy = {};
  site.Reopen();
  const v1::CommitUploadResponse accepted = ValueOrDie(Upload(*site.coordinator, acme, expert, module));
  CHECK(accepted.rejection().empty());
  CHECK(accepted.expert().module().sha256() == ValueOrDie(Sha256File(module)));
  CHECK(ValueOrDie(site.coordinator->CheckStore(site.admin, v1::CheckStoreRequest())).unrepaired() == 0);
}

TEST_CASE("identity and authorization", "[coordinator_logic]") {
  Site site;
  auto [acme, acme_cert] = site.Enroll("acme");
  auto [beta, beta_cert] = site.Enroll("beta");
  const std::string acme_expert = site.Register("acme", "math");
  SECTION("an owner cannot write another owner's expert") {
    CHECK(absl::IsPermissionDenied(site.coordinator->BeginUpload(beta, acme_expert, ManifestOf(site.Module("m"))).status()));
  }
  SECTION("owners cannot upload operator blobs or read other modules") {
    CHECK(absl::IsPermissionDenied(site.coordinator->BeginUpload(acme, "", ManifestOf(site.Module("m"))).status()));
    const std::string module = site.Module("m2");
    REQUIRE(ValueOrDie(Upload(*site.coordinator, acme, acme_expert, module)).rejection().empty());
    CHECK(absl::IsNotFound(site.coordinator->ReadBlob(beta, ValueOrDie(Sha256File(module)), 0, 10).status()));
    // Anchor files are readable by every owner.
    v1::Anchor a = ValueOrDie(site.coordinator->GetAnchor(""));
    CHECK(site.coordinator->ReadBlob(beta, a.files(0).blob().sha256(), 0, 10).ok());
  }
  SECTION("a revoked owner is refused on its next call") {
    v1::RevokeOwnerRequest r;
    r.set_owner_id("acme");
    r.set_reason("laptop stolen");
    REQUIRE(site.coordinator->RevokeOwner(site.admin, r).ok());
    absl::Status s = site.coordinator->Authenticate(acme_cert).status();
    CHECK(absl::IsPermissionDenied(s));
    CHECK_THAT(std::string(s.message()), Catch::Contains("laptop stolen"));
    CHECK(site.coordinator->Authenticate(beta_cert).ok());
  }
  SECTION("tokens are one-time and expire") {
    v1::AddOwnerRequest add;
    add.set_owner_id("gamma");
    add.set_token_ttl_seconds(-1);  // server default
    const std::string token = ValueOrDie(site.coordinator->AddOwner(site.admin, add)).token();
    v1::EnrollRequest e;
    e.set_owner_id("gamma");
    e.set_token("not the token");
    e.set_csr_pem(ValueOrDie(MakeKeyAndCsr("gamma")).csr_pem);
    CHECK_THAT(std::string(site.coordinator->Enroll(e).status().message()), Catch::Contains("wrong token"));
    e.set_token(token);
    REQUIRE(site.coordinator->Enroll(e).ok());
    CHECK_THAT(std::string(site.coordinator->Enroll(e).status().message()), Catch::Contains("already used"));
    // Expired: a token valid for an hour, used an hour and a second later.
    v1::AddOwnerRequest quick;
    quick.set_owner_id("delta");
    quick.set_token_ttl_seconds(3600);
    const std::string t2 = ValueOrDie(site.coordinator->AddOwner(site.admin, quick)).token();
    site.now += 3601;
    v1::EnrollRequest late;
    late.set_owner_id("delta");
    late.set_token(t2);
    late.set_csr_pem(ValueOrDie(MakeKeyAndCsr("delta")).csr_pem);
    CHECK_THAT(std::string(site.coordinator->Enroll(late).status().message()), Catch::Contains("expired"));
  }
  SECTION("a certificate from another CA names no known owner's current certificate") {
    auto [other_key, other_ca] = ValueOrDie(MakeCa("other CA", 10));
    IssuedCertificate forged = ValueOrDie(SignCsr(other_key, other_ca.certificate_pem, ValueOrDie(MakeKeyAndCsr("acme")).csr_pem, "acme", "owner", 10));
    CHECK(absl::IsPermissionDenied(site.coordinator->Authenticate(forged.certificate_pem).status()));
  }
  SECTION("a retired expert accepts no upload and cannot come back") {
    v1::SetExpertStateRequest retire;
    retire.set_expert_id(acme_expert);
    retire.set_state(v1::EXPERT_STATE_RETIRED);
    REQUIRE(site.coordinator->SetExpertState(site.admin, retire).ok());
    CHECK(absl::IsFailedPrecondition(site.coordinator->BeginUpload(acme, acme_expert, ManifestOf(site.Module("m3"))).status()));
    retire.set_state(v1::EXPERT_STATE_ACTIVE);
    CHECK(absl::IsFailedPrecondition(site.coordinator->SetExpertState(site.admin, retire).status()));
  }
}

// Issue #13, row 1: owner B declared owner A's module hash for its own expert with no data, was told
// nothing was missing, and committing gave B's expert A's module.
TEST_CASE("an owner cannot claim another owner's module by its hash, nor learn that it exists", "[coordinator_logic]") {
  Site site;
  auto [acme, acme_cert] = site.Enroll("acme");
  auto [beta, beta_cert] = site.Enroll("beta");
  const std::string acme_expert = site.Register("acme", "math"), beta_expert = site.Register("beta", "code");
  const std::string module = site.Module("m");
  REQUIRE(ValueOrDie(Upload(*site.coordinator, acme, acme_expert, module)).rejection().empty());
  const v1::Manifest manifest = ManifestOf(module);
  v1::UploadStatus claim = ValueOrDie(site.coordinator->BeginUpload(beta, beta_expert, manifest));
  CHECK(claim.missing_size() == manifest.chunks_size());  // the bytes must come through this session
  absl::Status commit = site.coordinator->CommitUpload(beta, claim.session_id()).status();
  CHECK(absl::IsFailedPrecondition(commit));
  CHECK(ValueOrDie(site.coordinator->GetExpert(beta, beta_expert)).module().sha256().empty());
  // No existence oracle: another owner's module and no blob at all get the same answer.
  const absl::Status theirs = site.coordinator->GetManifest(beta, manifest.blob().sha256()).status();
  const absl::Status none = site.coordinator->GetManifest(beta, std::string(64, '0')).status();
  CHECK(absl::IsNotFound(theirs));
  CHECK(theirs.code() == none.code());
  CHECK(std::string(theirs.message()).substr(0, 14) == std::string(none.message()).substr(0, 14));
}

// Issue #13, row 4: 12 concurrent enrollments with one token gave 2 certificates.
TEST_CASE("a one-time token enrolls once, however many enrollments race for it", "[coordinator_logic]") {
  Site site;
  v1::AddOwnerRequest add;
  add.set_owner_id("gamma");
  const std::string token = ValueOrDie(site.coordinator->AddOwner(site.admin, add)).token();
  constexpr int kTries = 12;
  std::vector<v1::EnrollRequest> requests(kTries);
  for (v1::EnrollRequest& e : requests) {
    e.set_owner_id("gamma");
    e.set_token(token);
    e.set_csr_pem(ValueOrDie(MakeKeyAndCsr("gamma")).csr_pem);
  }
  std::vector<absl::StatusOr<v1::EnrollResponse>> results(kTries, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < kTries; ++i) threads.emplace_back([&, i] { results[i] = site.coordinator->Enroll(requests[i]); });
  for (std::thread& t : threads) t.join();
  int enrolled = 0;
  for (const auto& r : results) {
    if (r.ok()) {
      ++enrolled;
      CHECK(site.coordinator->Authenticate(r->certificate_pem()).ok());
    } else {
      CHECK_THAT(std::string(r.status().message()), Catch::Contains("already used"));
    }
  }
  CHECK(enrolled == 1);
  std::string audit;
  const v1::TailAuditResponse tail = ValueOrDie(site.coordinator->TailAudit(100));
  for (const std::string& line : tail.events()) audit += line + "\n";
  size_t ok_events = 0;
  for (size_t at = audit.find("\"owner.enroll\""); at != std::string::npos; at = audit.find("\"owner.enroll\"", at + 1)) {
    const size_t end = audit.find('\n', at);
    ok_events += audit.substr(at, end - at).find("\"ok\"") != std::string::npos ? 1 : 0;
  }
  CHECK(ok_events == 1);
}

// Issue #13, rows 6 and 7: unauthenticated enrollments audited megabyte ids; a CSR whose CN is not
// UTF-8 made the audit write throw.
TEST_CASE("enrollment input is bounded and validated before it is audited", "[coordinator_logic]") {
  Site site;
  v1::EnrollRequest flood;
  flood.set_owner_id(std::string(2 << 20, 'a'));
  flood.set_token("t");
  CHECK(absl::IsPermissionDenied(site.coordinator->Enroll(flood).status()));
  {
    const v1::TailAuditResponse tail = ValueOrDie(site.coordinator->TailAudit(1));
    REQUIRE(tail.events_size() == 1);
    CHECK(tail.events(0).size() < 400);
    CHECK_THAT(tail.events(0), Catch::Contains("not a valid owner id"));
  }
  v1::AddOwnerRequest add;
  add.set_owner_id("gamma");
  const std::string token = ValueOrDie(site.coordinator->AddOwner(site.admin, add)).token();
  v1::EnrollRequest bad_cn;
  bad_cn.set_owner_id("gamma");
  bad_cn.set_token(token);
  bad_cn.set_csr_pem(ValueOrDie(MakeKeyAndCsr("\xff\xfe gamma")).csr_pem);
  absl::StatusOr<v1::EnrollResponse> r = absl::UnknownError("not run");
  CHECK_NOTHROW(r = site.coordinator->Enroll(bad_cn));
  const v1::TailAuditResponse tail = ValueOrDie(site.coordinator->TailAudit(1));
  REQUIRE(tail.events_size() == 1);
  CHECK_THAT(tail.events(0), Catch::Contains("owner.enroll"));
}

// Chunk `i` of the file `bytes` (manifest `m`) for `session`, as a client sends it.
v1::UploadChunk ChunkOf(const std::string& bytes, const v1::Manifest& m, const std::string& session, int i) {
  v1::UploadChunk c;
  c.set_session_id(session);
  c.set_index(static_cast<uint64_t>(i));
  c.set_data(bytes.substr(static_cast<size_t>(i) * kChunk, m.chunks(i).size()));
  c.set_sha256(m.chunks(i).sha256());
  return c;
}

void PutAllChunks(Coordinator& c, const PeerIdentity& who, const std::string& path, const std::string& session) {
  const std::string bytes = ValueOrDie(ReadFile(path));
  const v1::Manifest m = ManifestOf(path);
  for (int i = 0; i < m.chunks_size(); ++i) REQUIRE(c.PutChunk(who, ChunkOf(bytes, m, session, i)).ok());
}

// Issue #13, row 10: chunk writes racing a commit re-created the session folder after the commit
// dropped it (3 of 12 tries), and the folder survived restarts.
TEST_CASE("chunks racing a commit never leave a session folder behind", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string expert = site.Register("acme", "x");
  for (int attempt = 0; attempt < 12; ++attempt) {
    INFO("attempt " << attempt);
    const std::string module = site.Module("race" + std::to_string(attempt));
    const std::string bytes = ValueOrDie(ReadFile(module));
    const v1::Manifest m = ManifestOf(module);
    const std::string session = ValueOrDie(site.coordinator->BeginUpload(acme, expert, m)).session_id();
    auto chunk = [&](int i) { return ChunkOf(bytes, m, session, i); };
    PutAllChunks(*site.coordinator, acme, module, session);
    std::vector<std::thread> threads;
    threads.emplace_back([&] { CHECK(site.coordinator->CommitUpload(acme, session).ok()); });
    for (int t = 0; t < 3; ++t) {
      threads.emplace_back([&, t] {
        for (int k = 0; k < 20; ++k) site.coordinator->PutChunk(acme, chunk((t + k) % m.chunks_size())).IgnoreError();
      });
    }
    for (std::thread& t : threads) t.join();
    CHECK_FALSE(fs::exists(fs::path(site.coordinator->blobs().root()) / "uploads" / session));
  }
}

// Issue #13, row 9: whole-row read-modify-writes lost operator decisions: a commit racing `expert
// disable` left the expert active, a retired expert accepted a module begun before the retire, and
// a heartbeat could rewrite a revoked owner as not revoked.
TEST_CASE("operator decisions survive commits and heartbeats racing them", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string expert = site.Register("acme", "x");
  REQUIRE(ValueOrDie(Upload(*site.coordinator, acme, expert, site.Module("first"))).rejection().empty());
  auto set_state = [&](v1::ExpertState state) {
    v1::SetExpertStateRequest r;
    r.set_expert_id(expert);
    r.set_state(state);
    return site.coordinator->SetExpertState(site.admin, r);
  };
  for (int attempt = 0; attempt < 24; ++attempt) {
    INFO("attempt " << attempt);
    REQUIRE(set_state(v1::EXPERT_STATE_ACTIVE).ok());
    const std::string module = site.Module("m" + std::to_string(attempt));
    const v1::Manifest m = ManifestOf(module);
    const std::string session = ValueOrDie(site.coordinator->BeginUpload(acme, expert, m)).session_id();
    PutAllChunks(*site.coordinator, acme, module, session);
    absl::Status disabled;
    std::thread commit([&] { CHECK(site.coordinator->CommitUpload(acme, session).ok()); });
    std::thread disable([&] { disabled = set_state(v1::EXPERT_STATE_DISABLED).status(); });
    commit.join();
    disable.join();
    REQUIRE(disabled.ok());
    const v1::Expert e = ValueOrDie(site.coordinator->GetExpert(site.admin, expert));
    CHECK(e.state() == v1::EXPERT_STATE_DISABLED);  // the disable returned OK: it holds
    CHECK(e.module().sha256() == m.blob().sha256());
  }
  // Retired while a module was in flight: the module is refused, the expert keeps its last one.
  const std::string last = ValueOrDie(site.coordinator->GetExpert(site.admin, expert)).module().sha256();
  const std::string late = site.Module("late");
  const v1::Manifest lm = ManifestOf(late);
  const std::string session = ValueOrDie(site.coordinator->BeginUpload(acme, expert, lm)).session_id();
  PutAllChunks(*site.coordinator, acme, late, session);
  REQUIRE(set_state(v1::EXPERT_STATE_RETIRED).ok());
  const v1::CommitUploadResponse r = ValueOrDie(site.coordinator->CommitUpload(acme, session));
  CHECK(r.rejection() == "retired");
  const v1::Expert e = ValueOrDie(site.coordinator->GetExpert(site.admin, expert));
  CHECK(e.state() == v1::EXPERT_STATE_RETIRED);
  CHECK(e.module().sha256() == last);
  // A heartbeat racing a revocation never un-revokes.
  for (int attempt = 0; attempt < 8; ++attempt) {
    const std::string id = "h" + std::to_string(attempt);
    auto [owner, owner_cert] = site.Enroll(id);
    std::thread beat([&] {
      for (int k = 0; k < 20; ++k) site.coordinator->Heartbeat(owner, v1::HeartbeatRequest()).IgnoreError();
    });
    v1::RevokeOwnerRequest revoke;
    revoke.set_owner_id(id);
    CHECK(site.coordinator->RevokeOwner(site.admin, revoke).ok());
    beat.join();
    CHECK_FALSE(site.coordinator->Authenticate(owner_cert).ok());
  }
}

// Issue #13, row 14: the threat model promised re-enrollment after revocation; AddOwner answered
// ALREADY_EXISTS and no RPC re-enrolled.
TEST_CASE("a revoked owner is re-enrolled by a new token; the old certificate stays refused", "[coordinator_logic]") {
  Site site;
  auto [acme, old_cert] = site.Enroll("acme");
  v1::AddOwnerRequest again;
  again.set_owner_id("acme");
  CHECK(absl::IsFailedPrecondition(site.coordinator->ReenrollOwner(site.admin, again).status()));  // not revoked
  v1::RevokeOwnerRequest revoke;
  revoke.set_owner_id("acme");
  REQUIRE(site.coordinator->RevokeOwner(site.admin, revoke).ok());
  CHECK(absl::IsAlreadyExists(site.coordinator->AddOwner(site.admin, again).status()));
  const std::string token = ValueOrDie(site.coordinator->ReenrollOwner(site.admin, again)).token();
  CHECK_FALSE(site.coordinator->Authenticate(old_cert).ok());
  v1::EnrollRequest e;
  e.set_owner_id("acme");
  e.set_token(token);
  e.set_csr_pem(ValueOrDie(MakeKeyAndCsr("acme")).csr_pem);
  const std::string new_cert = ValueOrDie(site.coordinator->Enroll(e)).certificate_pem();
  CHECK(site.coordinator->Authenticate(new_cert).ok());
  CHECK_FALSE(site.coordinator->Authenticate(old_cert).ok());
  CHECK_THAT(std::string(site.coordinator->Enroll(e).status().message()), Catch::Contains("already used"));
}

// Issue #13, row 6 (second half): after huge events, Admin.TailAudit failed with RESOURCE_EXHAUSTED
// and `flexfedctl audit tail` exited 1.
TEST_CASE("the audit tail always fits a message, and pages back", "[coordinator_logic]") {
  Site site;
  {
    std::ofstream f(site.dir / "coordinator/audit.jsonl", std::ios::app);
    f << "{\"action\":\"huge\",\"x\":\"" << std::string(20 << 20, 'x') << "\"}\n";
  }
  for (int i = 0; i < 3; ++i) site.Enroll("o" + std::to_string(i));
  const v1::TailAuditResponse all = ValueOrDie(site.coordinator->TailAudit(1000));
  size_t bytes = 0;
  bool cut = false;
  for (const std::string& e : all.events()) {
    bytes += e.size();
    CHECK(e.size() < (64 << 10) + 64);
    cut = cut || e.find("more bytes cut") != std::string::npos;
  }
  CHECK(cut);
  CHECK(bytes <= (4u << 20));
  const v1::TailAuditResponse newest = ValueOrDie(site.coordinator->TailAudit(2));
  const v1::TailAuditResponse older = ValueOrDie(site.coordinator->TailAudit(2, 2));
  REQUIRE(newest.events_size() == 2);
  REQUIRE(older.events_size() == 2);
  CHECK(newest.more());
  CHECK(newest.events(0) != older.events(1));
  CHECK(newest.events(0) == all.events(all.events_size() - 2));
  CHECK(older.events(1) == all.events(all.events_size() - 3));
}

// Issue #13, row 2: sessions were owned by id alone, and owner ids are chosen by operators.
TEST_CASE("an owner whose id is an operator's cannot reach the operator's upload sessions", "[coordinator_logic]") {
  Site site;
  auto [impostor, cert] = site.Enroll(site.admin.id);
  REQUIRE(impostor.role == "owner");
  const std::string blob = site.dir / "operator.bin";
  REQUIRE(WriteFileAtomically(blob, std::string(200000, 'x')).ok());
  v1::UploadStatus s = ValueOrDie(site.coordinator->BeginUpload(site.admin, "", ManifestOf(blob)));
  CHECK(absl::IsPermissionDenied(site.coordinator->QueryMissing(impostor, s.session_id()).status()));
  v1::UploadChunk chunk;
  chunk.set_session_id(s.session_id());
  chunk.set_index(0);
  chunk.set_data(std::string(kChunk, 'x'));
  chunk.set_sha256(ManifestOf(blob).chunks(0).sha256());
  CHECK(absl::IsPermissionDenied(site.coordinator->PutChunk(impostor, chunk).status()));
  CHECK(absl::IsPermissionDenied(site.coordinator->CommitUpload(impostor, s.session_id()).status()));
  CHECK(site.coordinator->PutChunk(site.admin, chunk).ok());  // the operator still can
}

TEST_CASE("releases: active experts in registration order; immutable; disabling changes only later releases", "[coordinator_logic]") {
  Site site;
  auto [acme, c1] = site.Enroll("acme");
  auto [beta, c2] = site.Enroll("beta");
  const std::string code = site.Register("acme", "code"), bible = site.Register("beta", "bible");
  auto set_state = [&](const std::string& id, v1::ExpertState state) {
    v1::SetExpertStateRequest r;
    r.set_expert_id(id);
    r.set_state(state);
    return site.coordinator->SetExpertState(site.admin, r).status();
  };
  v1::BuildReleaseRequest build;
  CHECK(absl::IsFailedPrecondition(site.coordinator->BuildRelease(site.admin, build).status()));  // nothing active yet
  CHECK(absl::IsNotFound(site.coordinator->GetRelease("").status()));
  const std::string m1 = site.Module("m1"), m2 = site.Module("m2", [](testing::RawTensors& t, ExpertModuleMetadata& m) {
    testing::RawTensor& row = t["layers.0.router.weight"];
    for (int64_t i = 0; i < row.numel(); ++i) row.SetF32(i, 2 * row.F32(i));
    m.owner = "beta";
  });
  REQUIRE(ValueOrDie(Upload(*site.coordinator, acme, code, m1)).rejection().empty());
  REQUIRE(ValueOrDie(Upload(*site.coordinator, beta, bible, m2)).rejection().empty());
  REQUIRE(set_state(code, v1::EXPERT_STATE_ACTIVE).ok());
  REQUIRE(set_state(bible, v1::EXPERT_STATE_ACTIVE).ok());

  const v1::Release r1 = ValueOrDie(site.coordinator->BuildRelease(site.admin, build));
  CHECK(r1.release_id() == "rel-0001");
  CHECK(r1.manifest_sha256() == Sha256Hex(r1.manifest_json()));
  ReleaseManifest m = ValueOrDie(ReleaseManifest::FromJson(r1.manifest_json(), "r1"));
  CHECK(m.anchor_id == site.anchor_id);
  REQUIRE(m.experts.size() == 2);
  CHECK(m.experts[0].expert_id == code);  // registration order
  CHECK(m.experts[0].index == 1);
  CHECK(m.experts[0].module_sha256 == ValueOrDie(Sha256File(m1)));
  CHECK(m.experts[1].expert_id == bible);
  CHECK(m.top_k == 3);  // default: every expert, the public one included

  // --exclude and --k
  build.add_exclude(bible);
  build.set_top_k(2);
  m = ValueOrDie(ReleaseManifest::FromJson(ValueOrDie(site.coordinator->BuildRelease(site.admin, build)).manifest_json(), "r2"));
  CHECK(m.release_id == "rel-0002");
  CHECK(m.experts.size() == 1);
  CHECK(m.excluded == std::vector<std::string>{bible});
  CHECK(m.top_k == 2);
  build.set_top_k(3);  // only two experts are left
  CHECK_THAT(std::string(site.coordinator->BuildRelease(site.admin, build).status().message()), Catch::Contains("outside 1..2"));
  build.clear_exclude();
  build.add_exclude("nobody/x");
  CHECK(absl::IsNotFound(site.coordinator->BuildRelease(site.admin, build).status()));

  // Disabling beta's expert: the next release leaves it out; release 1 stays as it was.
  REQUIRE(set_state(bible, v1::EXPERT_STATE_DISABLED).ok());
  build.clear_exclude();
  build.set_top_k(0);
  const v1::Release r3 = ValueOrDie(site.coordinator->BuildRelease(site.admin, build));
  m = ValueOrDie(ReleaseManifest::FromJson(r3.manifest_json(), "r3"));
  CHECK(m.experts.size() == 1);
  CHECK(m.experts[0].expert_id == code);
  build.add_exclude(bible);  // a disabled expert is in no release anyway: say so
  CHECK_THAT(std::string(site.coordinator->BuildRelease(site.admin, build).status().message()), Catch::Contains("disabled"));
  const v1::Release again = ValueOrDie(site.coordinator->GetRelease("rel-0001"));
  CHECK(again.manifest_json() == r1.manifest_json());
  CHECK(ValueOrDie(site.coordinator->GetRelease("")).release_id() == "rel-0003");
  CHECK(ValueOrDie(site.coordinator->ListReleases()).releases_size() == 3);
  std::string audit;
  const v1::TailAuditResponse tail = ValueOrDie(site.coordinator->TailAudit(100));
  for (const std::string& line : tail.events()) audit += line + "\n";
  CHECK_THAT(audit, Catch::Contains("release.build"));
}

TEST_CASE("release manifests: parsing checks every field", "[coordinator_logic]") {
  ReleaseManifest m;
  m.release_id = ReleaseIdForNumber(12);
  m.anchor_id = std::string(64, 'a');
  m.experts.push_back({1, "acme/code", "acme", "code", "Python", std::string(64, 'b'), 100, 5});
  m.top_k = 2;
  m.created_unix = 1700000000;
  const std::string text = m.ToJson();
  ReleaseManifest back = ValueOrDie(ReleaseManifest::FromJson(text, "m"));
  CHECK(back.ToJson() == text);
  CHECK(back.release_id == "rel-0012");
  auto broken = [&](const std::string& from, const std::string& to) {
    std::string t = text;
    REQUIRE(t.find(from) != std::string::npos);
    t.replace(t.find(from), from.size(), to);
    return std::string(ReleaseManifest::FromJson(t, "m").status().message());
  };
  CHECK_THAT(broken("\"top_k\": 2", "\"top_k\": 3"), Catch::Contains("top_k"));
  CHECK_THAT(broken("\"index\": 1", "\"index\": 2"), Catch::Contains("index"));
  CHECK_THAT(broken(std::string(64, 'b'), "bb"), Catch::Contains("module_sha256"));
  CHECK_THAT(broken("rel-0012", "rel-x"), Catch::Contains("release id"));
  CHECK_THAT(broken("flexfed-release/1", "flexfed-release/9"), Catch::Contains("format"));
  CHECK_THAT(std::string(ReleaseManifest::FromJson("[]", "m").status().message()), Catch::Contains("m: not a valid release manifest"));
}



namespace check {

// Findings of one kind, by object.
std::map<std::string, v1::StoreFinding> Of(const v1::CheckStoreResponse& r, const std::string& kind) {
  std::map<std::string, v1::StoreFinding> out;
  for (const v1::StoreFinding& f : r.findings()) {
    if (f.kind() == kind) out[f.object()] = f;
  }
  return out;
}

// Writes a file where a crash would have left it (folders made as needed).
void Plant(const std::string& path, const std::string& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  REQUIRE(WriteFileAtomically(path, bytes).ok());
}

v1::CheckStoreRequest Request(bool repair, bool skip_hashes) {
  v1::CheckStoreRequest r;
  r.set_repair(repair);
  r.set_skip_hashes(skip_hashes);
  return r;
}

}  // namespace check

// Issue #13: what a crash leaves in the store (folders of finished sessions, blobs never recorded,
// manifests without blobs, files nothing can serve) is found, reported and — at start-up or when
// asked — removed; damaged or missing modules and anchor files are reported, never "repaired".
TEST_CASE("the store check repairs what a crash leaves and reports damage", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string expert = site.Register("acme", "math");
  const std::string module = site.Module("good");
  v1::CommitUploadResponse committed = ValueOrDie(Upload(*site.coordinator, acme, expert, module));
  REQUIRE(committed.rejection().empty());
  const std::string module_sha = committed.expert().module().sha256();
  // An upload in progress: its folder is no stray.
  const std::string other = site.Module("other");
  const std::string open_session = ValueOrDie(site.coordinator->BeginUpload(acme, expert, ManifestOf(other))).session_id();
  REQUIRE(site.coordinator->PutChunk(acme, testing::ChunkOf(other, open_session, 0)).ok());

  const v1::CheckStoreResponse clean = ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(false, false)));
  CHECK(clean.findings_size() == 0);
  CHECK(clean.unrepaired() == 0);
  CHECK(clean.blobs() == 4);  // three anchor files and the module
  CHECK(clean.bytes_hashed() > 0);
  CHECK(clean.sessions() == 1);

  // What a crash can leave.
  const fs::path store = site.dir / "coordinator/store";
  const std::string committed_session = ValueOrDie(site.coordinator->BeginUpload(acme, expert, ManifestOf(module))).session_id();
  fs::create_directories(store / "uploads" / committed_session);  // a finished session's folder
  REQUIRE(WriteFileAtomically(store / "uploads" / committed_session / "0.ok", "").ok());
  const std::string unknown_session(32, 'e');
  fs::create_directories(store / "uploads" / unknown_session);
  fs::create_directories(store / "uploads/not-a-session");
  const std::string garbage = "bytes stored but never recorded";
  const std::string garbage_sha = Sha256Hex(garbage);
  check::Plant(site.coordinator->blobs().PathOf(garbage_sha), garbage);
  const std::string lost_sha(64, 'c');
  REQUIRE(WriteFileAtomically(store / "manifests" / (lost_sha + ".json"), "{}").ok());
  REQUIRE(WriteFileAtomically(store / "blobs/readme.txt", "not a blob").ok());

  const v1::CheckStoreResponse found = ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(false, true)));
  CHECK(check::Of(found, "stray_session").size() == 3);
  CHECK(check::Of(found, "stray_session").count(committed_session) == 1);
  CHECK(check::Of(found, "stray_session").count(unknown_session) == 1);
  CHECK(check::Of(found, "stray_session").count(open_session) == 0);
  CHECK(check::Of(found, "unreferenced_blob").count(garbage_sha) == 1);
  CHECK(check::Of(found, "stray_manifest").count(lost_sha + ".json") == 1);
  CHECK(check::Of(found, "stray_file").count("blobs/readme.txt") == 1);
  CHECK(found.findings_size() == 6);
  CHECK(found.unrepaired() == 6);  // reported, nothing touched
  CHECK(fs::exists(site.coordinator->blobs().PathOf(garbage_sha)));
  CHECK(site.coordinator->counters().store_problems == 6);

  // A restart repairs all of it; the open upload and its chunk survive.
  site.Reopen();
  const v1::CheckStoreResponse& startup = site.coordinator->startup_check();
  CHECK(startup.findings_size() == 6);
  CHECK(startup.unrepaired() == 0);
  CHECK_FALSE(fs::exists(store / "uploads" / committed_session));
  CHECK_FALSE(fs::exists(store / "uploads" / unknown_session));
  CHECK_FALSE(fs::exists(store / "uploads/not-a-session"));
  CHECK_FALSE(fs::exists(site.coordinator->blobs().PathOf(garbage_sha)));
  CHECK_FALSE(fs::exists(store / "manifests" / (lost_sha + ".json")));
  CHECK_FALSE(fs::exists(store / "blobs/readme.txt"));
  CHECK(ValueOrDie(site.coordinator->QueryMissing(acme, open_session)).received_bytes() > 0);
  CHECK(ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(false, false))).findings_size() == 0);

  // The module damaged in place (same size): only hashing finds it; it is reported, not removed.
  std::string bytes = ValueOrDie(ReadFile(module));
  bytes[bytes.size() / 2] ^= 1;
  REQUIRE(WriteFileAtomically(site.coordinator->blobs().PathOf(module_sha), bytes).ok());
  CHECK(ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(true, true))).findings_size() == 0);
  v1::CheckStoreResponse damaged = ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(true, false)));
  REQUIRE(check::Of(damaged, "damaged_blob").count(module_sha) == 1);
  CHECK_THAT(check::Of(damaged, "damaged_blob")[module_sha].detail(), Catch::Contains("expert " + expert));
  CHECK_FALSE(check::Of(damaged, "damaged_blob")[module_sha].repaired());
  CHECK(site.coordinator->blobs().Has(module_sha));
  // Truncated: the size says so without hashing.
  REQUIRE(WriteFileAtomically(site.coordinator->blobs().PathOf(module_sha), bytes.substr(0, 100)).ok());
  CHECK(check::Of(ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(true, true))), "damaged_blob").count(module_sha) == 1);
  // Gone: missing, with what to do.
  fs::remove(site.coordinator->blobs().PathOf(module_sha));
  damaged = ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(true, true)));
  REQUIRE(check::Of(damaged, "missing_blob").count(module_sha) == 1);
  CHECK_THAT(check::Of(damaged, "missing_blob")[module_sha].detail(), Catch::Contains("pushes the expert again"));
  CHECK(damaged.unrepaired() == 1);
  CHECK(site.coordinator->counters().store_problems == 1);
  // An anchor file gone is reported with its name.
  const v1::Anchor anchor = ValueOrDie(site.coordinator->GetAnchor(""));
  fs::remove(site.coordinator->blobs().PathOf(anchor.files(0).blob().sha256()));
  damaged = ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(true, true)));
  CHECK_THAT(check::Of(damaged, "missing_blob")[anchor.files(0).blob().sha256()].detail(), Catch::Contains(anchor.files(0).name()));
}

// Repairing checks run while owners upload the very bytes a crash left unreferenced: the blob
// becomes referenced when the upload begins, and a commit holds it from assembly to record (the
// check re-checks under an exclusive lock before removing), so no module is ever lost.
TEST_CASE("store checks racing uploads of a blob left unreferenced never lose the module", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  for (int round = 0; round < 8; ++round) {
    INFO("round " << round);
    const std::string expert = site.Register("acme", "e" + std::to_string(round));
    const std::string module = site.Module("m" + std::to_string(round));
    const std::string sha = ValueOrDie(Sha256File(module));
    // The module's bytes already in the store, unreferenced (a crash after assembly, before the record).
    check::Plant(site.coordinator->blobs().PathOf(sha), ValueOrDie(ReadFile(module)));
    std::atomic<bool> done{false};
    std::thread checker([&] {
      while (!done) REQUIRE(site.coordinator->CheckStore(site.admin, check::Request(true, true)).ok());
    });
    v1::CommitUploadResponse r = ValueOrDie(Upload(*site.coordinator, acme, expert, module));
    done = true;
    checker.join();
    REQUIRE(r.rejection().empty());
    CHECK(site.coordinator->blobs().Has(sha));
    CHECK(ValueOrDie(site.coordinator->CheckStore(site.admin, check::Request(false, false))).findings_size() == 0);
  }
}

}  // namespace
}  // namespace flexfed

namespace flexfed {
namespace {

// Found by the mixed concurrency test (issue #13): a registered expert could be disabled, leaving
// a "disabled" expert with no module; only an expert with a module is enabled or disabled.
TEST_CASE("an expert without a module can be neither enabled nor disabled, only retired", "[coordinator_logic]") {
  Site site;
  site.Enroll("acme");
  const std::string expert = site.Register("acme", "math");
  for (v1::ExpertState state : {v1::EXPERT_STATE_ACTIVE, v1::EXPERT_STATE_DISABLED}) {
    v1::SetExpertStateRequest r;
    r.set_expert_id(expert);
    r.set_state(state);
    absl::StatusOr<v1::Expert> set = site.coordinator->SetExpertState(site.admin, r);
    CHECK(absl::IsFailedPrecondition(set.status()));
    CHECK_THAT(std::string(set.status().message()), Catch::Contains("no uploaded module yet"));
  }
  CHECK(ValueOrDie(site.coordinator->GetExpert(site.admin, expert)).state() == v1::EXPERT_STATE_REGISTERED);
  v1::SetExpertStateRequest retire;
  retire.set_expert_id(expert);
  retire.set_state(v1::EXPERT_STATE_RETIRED);
  CHECK(ValueOrDie(site.coordinator->SetExpertState(site.admin, retire)).state() == v1::EXPERT_STATE_RETIRED);
  CHECK(ValueOrDie(site.coordinator->CheckStore(site.admin, v1::CheckStoreRequest())).findings_size() == 0);
}

}  // namespace
}  // namespace flexfed

namespace flexfed {
namespace {

// Issue #13 (limits): an owner's unfinished uploads hold at most one module's room per expert — a
// new module pushed for the expert supersedes the older unfinished one (its folder goes), and the
// older one can be pushed again later.
TEST_CASE("one open upload per expert: a newer module supersedes an unfinished push", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string expert = site.Register("acme", "math");
  const std::string first = site.Module("first"), second = site.Module("second");
  const std::string old_session = ValueOrDie(site.coordinator->BeginUpload(acme, expert, ManifestOf(first))).session_id();
  REQUIRE(site.coordinator->PutChunk(acme, testing::ChunkOf(first, old_session, 0)).ok());
  const fs::path uploads = site.dir / "coordinator/store/uploads";
  REQUIRE(fs::exists(uploads / old_session));
  v1::CommitUploadResponse r = ValueOrDie(Upload(*site.coordinator, acme, expert, second));
  CHECK(r.rejection().empty());
  CHECK_FALSE(fs::exists(uploads / old_session));
  v1::CommitUploadResponse old = ValueOrDie(site.coordinator->CommitUpload(acme, old_session));
  CHECK(old.rejection() == "superseded");
  // Another owner's upload for its own expert is untouched by acme's.
  auto [beta, beta_cert] = site.Enroll("beta");
  const std::string beta_expert = site.Register("beta", "math");
  const std::string beta_session = ValueOrDie(site.coordinator->BeginUpload(beta, beta_expert, ManifestOf(first))).session_id();
  REQUIRE(site.coordinator->PutChunk(beta, testing::ChunkOf(first, beta_session, 0)).ok());
  ValueOrDie(site.coordinator->BeginUpload(acme, expert, ManifestOf(site.Module("third"))));
  CHECK(fs::exists(uploads / beta_session));
  // The first module again: a fresh start, and it commits.
  r = ValueOrDie(Upload(*site.coordinator, acme, expert, first));
  CHECK(r.rejection().empty());
  CHECK(r.expert().module().sha256() == ValueOrDie(Sha256File(first)));
  CHECK(ValueOrDie(site.coordinator->CheckStore(site.admin, v1::CheckStoreRequest())).findings_size() == 0);
}

// Issue #34 row 7: a CSR with a key the CA refuses leaves the one-time token unused.
TEST_CASE("an enrollment with a weak key is refused and leaves its token usable", "[coordinator_logic]") {
  Site site;
  v1::AddOwnerRequest add;
  add.set_owner_id("acme");
  const std::string token = ValueOrDie(site.coordinator->AddOwner(site.admin, add)).token();
  v1::EnrollRequest e;
  e.set_owner_id("acme");
  e.set_token(token);
  for (const std::string weak : {"rsa1024", "dsa1024"}) {
    e.set_csr_pem(testing::CsrWithKey(weak, "acme"));
    absl::StatusOr<v1::EnrollResponse> refused = site.coordinator->Enroll(e);
    CHECK(absl::IsPermissionDenied(refused.status()));
    CHECK_THAT(std::string(refused.status().message()), Catch::Contains("use a P-256 or P-384 key"));
  }
  e.set_csr_pem(testing::CsrWithKey("p384", "acme"));
  const std::string cert = ValueOrDie(site.coordinator->Enroll(e)).certificate_pem();
  CHECK(ValueOrDie(site.coordinator->Authenticate(cert)).id == "acme");
  CHECK_THAT(std::string(site.coordinator->Enroll(e).status().message()), Catch::Contains("already used"));
}

// Issue #34 row 8: a token lifetime of 2^63 - 1 seconds once overflowed into an expired token.
TEST_CASE("token lifetimes are bounded: an overflowing one is refused, a year's is honoured", "[coordinator_logic]") {
  Site site;
  v1::AddOwnerRequest add;
  add.set_owner_id("acme");
  for (const int64_t ttl : {std::numeric_limits<int64_t>::max(), Coordinator::kMaxTokenTtlSeconds + 1}) {
    add.set_token_ttl_seconds(ttl);
    absl::Status s = site.coordinator->AddOwner(site.admin, add).status();
    CHECK(absl::IsInvalidArgument(s));
    CHECK_THAT(std::string(s.message()), Catch::Contains("give 1 to 31622400 s"));
    CHECK(absl::IsInvalidArgument(site.coordinator->ReenrollOwner(site.admin, add).status()));
  }
  CHECK(ValueOrDie(site.coordinator->ListOwners()).owners_size() == 0);  // nothing half-made
  add.set_token_ttl_seconds(Coordinator::kMaxTokenTtlSeconds);
  const v1::AddOwnerResponse made = ValueOrDie(site.coordinator->AddOwner(site.admin, add));
  CHECK(made.token_expires_unix() == site.now + Coordinator::kMaxTokenTtlSeconds);
}

// ------------------------------------------------------------------ damaged blobs and full disks

ChunkLayout LayoutOf(const v1::Manifest& m) {
  ChunkLayout l{m.blob().sha256(), m.blob().size(), m.chunk_size(), {}};
  for (const v1::ChunkInfo& c : m.chunks()) l.chunk_sha256.push_back(c.sha256());
  return l;
}

// Issue #34 row 5: the stored copy of a module damaged on disk is never served, and the module's
// exact bytes pushed again (another expert, the same owner) replace it instead of attaching it.
TEST_CASE("a damaged stored module is refused to readers, and its bytes pushed again replace it", "[coordinator_logic]") {
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string module = site.Module("math");
  const std::string sha = ValueOrDie(Sha256File(module));
  REQUIRE(ValueOrDie(Upload(*site.coordinator, acme, site.Register("acme", "math"), module)).rejection().empty());
  const ChunkLayout layout = LayoutOf(ValueOrDie(site.coordinator->GetManifest(site.admin, sha)));
  REQUIRE(layout.chunk_sha256.size() >= 2);
  std::string bytes = ValueOrDie(ReadFile(module));
  bytes[bytes.size() - 10] ^= 1;  // the last chunk, damaged in place
  REQUIRE(WriteFileAtomically(site.coordinator->blobs().PathOf(sha), bytes).ok());
  const uint64_t last = layout.chunk_sha256.size() - 1;
  CHECK(site.coordinator->ReadChunk(site.admin, layout, 0).ok());
  absl::StatusOr<std::string> refused = site.coordinator->ReadChunk(site.admin, layout, last);
  CHECK(absl::IsDataLoss(refused.status()));
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("coordinator"));
  CHECK(site.coordinator->counters().damaged_reads == 1);

  REQUIRE(ValueOrDie(Upload(*site.coordinator, acme, site.Register("acme", "math2"), module)).rejection().empty());
  CHECK(ValueOrDie(Sha256File(site.coordinator->blobs().PathOf(sha))) == sha);
  CHECK(ValueOrDie(site.coordinator->ReadChunk(site.admin, layout, last)) == ValueOrDie(ReadFile(module)).substr(last * layout.chunk_size));
  CHECK(site.coordinator->counters().damaged_reads == 1);
}

// A torn last line (the process died inside a write) is cut when the log opens: never an event
// half-written, and the next one starts a line of its own.
TEST_CASE("the audit log cuts a torn last line when it opens", "[coordinator_logic]") {
  TempDir dir;
  const std::string path = dir / "audit.jsonl";
  {
    auto log = ValueOrDie(AuditLog::Open(path));
    REQUIRE(log->Append({"ops", "", "first", {}, "ok"}).ok());
  }
  const std::string whole = ValueOrDie(ReadFile(path));
  {
    std::ofstream torn(path, std::ios::app | std::ios::binary);
    torn << R"({"id":"0000","action":"second","obj)";
  }
  auto log = ValueOrDie(AuditLog::Open(path));
  CHECK(ValueOrDie(ReadFile(path)) == whole);
  REQUIRE(log->Append({"ops", "", "third", {}, "ok"}).ok());
  const std::vector<std::string> lines = ValueOrDie(log->Tail(10, 0, nullptr));
  REQUIRE(lines.size() == 2);
  for (const std::string& line : lines) CHECK_FALSE(nlohmann::json::parse(line, nullptr, false).is_discarded());
  CHECK_THAT(lines[1], Catch::Contains("third"));
}

// Fills the filesystem under `dir` to its last byte while alive (the disk-full tests run on a small
// tmpfs of their own: tests/coordinator/small_disk.sh).
class DiskFiller {
 public:
  explicit DiskFiller(const std::string& dir) : path_(dir + "/filler") {
    std::ofstream out(path_, std::ios::binary);
    for (size_t block : {size_t{1} << 20, size_t{4096}, size_t{1}}) {
      const std::string zeros(block, '\0');
      while (out.write(zeros.data(), static_cast<std::streamsize>(block)) && out.flush()) {
      }
      out.clear();
    }
  }
  ~DiskFiller() { std::filesystem::remove(path_); }

 private:
  std::string path_;
};

bool OnSmallDisk() {
  if (std::getenv("FLEXFED_SMALL_DISK") != nullptr) return true;
  WARN("not on a small disk of its own: run through ctest (coordinator/disk_full), which mounts one");
  return false;
}

// Issue #34 row 6: a commit that fails on a full disk keeps the received chunks, so its retry sends
// nothing again; the audit log takes every event whole or not at all; a store check that cannot
// be audited says so.
TEST_CASE("a full disk: the commit fails and keeps its chunks, the retry sends nothing, the audit log stays whole", "[.][disk_full]") {
  if (!OnSmallDisk()) return;
  Site site;
  auto [acme, cert] = site.Enroll("acme");
  const std::string expert = site.Register("acme", "math");
  const std::string module = site.Module("math");
  const v1::Manifest m = ManifestOf(module);
  const v1::UploadStatus begun = ValueOrDie(site.coordinator->BeginUpload(acme, expert, m));
  REQUIRE(testing::SendMissing(*site.coordinator, acme, begun, module).ok());
  const std::string audit = site.dir / "coordinator/audit.jsonl";
  const auto audit_lines_whole = [&] {
    std::ifstream in(audit, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!text.empty() && text.back() != '\n') return false;
    for (const absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
      if (nlohmann::json::parse(line.begin(), line.end(), nullptr, false).is_discarded()) return false;
    }
    return true;
  };
  {
    DiskFiller full(site.dir.path());
    absl::StatusOr<v1::CommitUploadResponse> failed = site.coordinator->CommitUpload(acme, begun.session_id());
    INFO(failed.status());
    CHECK_FALSE(failed.ok());
    CHECK(ValueOrDie(site.coordinator->QueryMissing(acme, begun.session_id())).missing_size() == 0);
    // An event too long for the log's last page: written short, and cut back off.
    CHECK_FALSE(ValueOrDie(site.coordinator->GetExpert(acme, expert)).has_module());
    {
      const std::string side = site.dir / "side.jsonl";
      auto log = ValueOrDie(AuditLog::Open(side));
      absl::StatusOr<std::string> appended = log->Append({"ops", "", "long", {}, std::string(20000, 'x')});
      CHECK(absl::IsResourceExhausted(appended.status()));
      CHECK_THAT(std::string(appended.status().message()), Catch::Contains("free space"));
      CHECK(std::filesystem::file_size(side) == 0);
    }
    CHECK(audit_lines_whole());
    // Read-only checks, each audited, until the log's last page has no room for one: that check
    // reports that it went unrecorded, and the log still holds whole lines only.
    bool unrecorded = false;
    for (int i = 0; i < 100 && !unrecorded; ++i) {
      const v1::CheckStoreResponse check = ValueOrDie(site.coordinator->CheckStore(site.admin, v1::CheckStoreRequest()));
      for (const v1::StoreFinding& f : check.findings()) unrecorded |= f.kind() == "audit_log" && !f.repaired();
    }
    CHECK(unrecorded);
    CHECK(site.coordinator->counters().audit_failures >= 1);
    CHECK(audit_lines_whole());
  }
  // Room again: the same commit, no chunk sent.
  const v1::CommitUploadResponse committed = ValueOrDie(site.coordinator->CommitUpload(acme, begun.session_id()));
  CHECK(committed.rejection().empty());
  CHECK(committed.expert().module().sha256() == m.blob().sha256());
  CHECK(ValueOrDie(Sha256File(site.coordinator->blobs().PathOf(m.blob().sha256()))) == m.blob().sha256());
  CHECK_FALSE(site.coordinator->blobs().HasSessionFolder(begun.session_id()));
  CHECK(audit_lines_whole());
  CHECK(ValueOrDie(site.coordinator->CheckStore(site.admin, v1::CheckStoreRequest())).findings_size() == 0);
}

}  // namespace
}  // namespace flexfed
