#include "ctl/release_commands.h"

#include <filesystem>
#include <iostream>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/model/anchor.h"
#include "common/merge/merge.h"
#include "common/train/data.h"
#include "ctl/hf_exactness.h"
#include "common/core/progress.h"
#include "common/core/release.h"
#include "ctl/remote.h"
#include <nlohmann/json.hpp>

namespace flexfed::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

ReleaseManifest Parse(const std::string& command, const v1::Release& r) {
  absl::StatusOr<ReleaseManifest> m = ReleaseManifest::FromJson(r.manifest_json(), absl::StrCat("release ", r.release_id()));
  if (!m.ok()) Fail(command, m.status());
  return *std::move(m);
}

// The release `id` (empty: the newest) and its parsed manifest, or exit naming `command`.
template <typename Client>
std::pair<v1::Release, ReleaseManifest> FetchRelease(const std::string& command, Client& client, const std::string& id) {
  v1::GetReleaseRequest req;
  req.set_release_id(id);
  v1::Release r = Call<v1::GetReleaseRequest, v1::Release>(command, client, &v1::Admin::Stub::GetRelease, req);
  ReleaseManifest m = Parse(command, r);
  return {std::move(r), std::move(m)};
}

void PrintRelease(const ReleaseManifest& m, const std::string& manifest_sha256) {
  std::cout << absl::StrFormat("release %s  (%s, manifest %s)\n", m.release_id, When(m.created_unix),
                               manifest_sha256.substr(0, 16));
  std::cout << absl::StrFormat("anchor  %s\nexperts %d (public + %d), k = %d\n", m.anchor_id, m.num_experts(),
                               m.experts.size(), m.top_k);
  std::cout << absl::StrFormat("  %-3s %-28s %-14s %12s  %s\n", "#", "EXPERT", "MODULE", "TOKENS", "DOMAIN");
  std::cout << absl::StrFormat("  %-3d %-28s %-14s %12s  %s\n", 0, "(public)", "anchor", "-", "the anchor's FFN");
  for (const ReleaseExpert& e : m.experts) {
    std::cout << absl::StrFormat("  %-3d %-28s %-14s %12d  %s\n", e.index, e.expert_id, e.module_sha256.substr(0, 12),
                                 e.tokens_trained, e.domain);
  }
  if (!m.excluded.empty()) std::cout << "excluded: " << absl::StrJoin(m.excluded, ", ") << "\n";
  if (!m.note.empty()) std::cout << "note: " << m.note << "\n";
}

// Downloads `release`'s anchor (unless `local_anchor` holds exactly it) and modules into `parts`,
// verifying every blob, then merges into `out`.
absl::StatusOr<MergedModel> Export(CoordinatorClient& client, const v1::Release& release, const ReleaseManifest& m,
                                   const std::string& local_anchor, const std::string& out, uint64_t max_shard_bytes) {
  std::error_code ec;
  if (fs::exists(out, ec)) return absl::AlreadyExistsError(absl::StrCat(out, ": already exists; choose a new directory"));
  const fs::path parts = fs::path(out).string() + ".parts";
  ProgressReporter progress;
  std::string anchor_dir = local_anchor;
  if (!anchor_dir.empty()) {
    absl::StatusOr<std::string> id = AnchorId(anchor_dir);
    if (!id.ok()) return id.status();
    if (*id != m.anchor_id) {
      return absl::InvalidArgumentError(absl::StrCat("--anchor ", anchor_dir, " is anchor ", id->substr(0, 16), "…, the release needs ",
                                                     m.anchor_id.substr(0, 16), "…; drop --anchor to download it"));
    }
  } else {
    v1::ListAnchorsResponse anchors = Call<v1::ListRequest, v1::ListAnchorsResponse>(
        "release export", client, &v1::Admin::Stub::ListAnchors, v1::ListRequest());
    const v1::Anchor* anchor = nullptr;
    for (const v1::Anchor& a : anchors.anchors()) {
      if (a.anchor_id() == m.anchor_id) anchor = &a;
    }
    if (anchor == nullptr) return absl::NotFoundError(absl::StrCat("the coordinator no longer lists anchor ", m.anchor_id));
    anchor_dir = (parts / "anchor").string();
    if (absl::Status s = client.DownloadAnchorFiles(*anchor, anchor_dir, &progress); !s.ok()) return s;
    absl::StatusOr<std::string> id = AnchorId(anchor_dir);
    if (!id.ok()) return id.status();
    if (*id != m.anchor_id) return absl::DataLossError(absl::StrCat(anchor_dir, ": downloaded anchor has id ", *id, ", not ", m.anchor_id));
  }
  std::vector<std::string> modules, hashes;
  fs::create_directories(parts / "modules", ec);
  for (const ReleaseExpert& e : m.experts) {
    const std::string path = (parts / "modules" / (e.module_sha256 + ".safetensors")).string();
    progress.Line(absl::StrCat("downloading expert ", e.expert_id));
    if (absl::Status s = client.DownloadBlob(e.module_sha256, path, &progress); !s.ok()) return s;
    modules.push_back(path);
    hashes.push_back(e.module_sha256);
  }
  progress.Line(absl::StrCat("merging ", m.experts.size(), " experts into ", out));
  MergeOptions options;
  options.top_k = m.top_k;
  options.max_shard_bytes = max_shard_bytes;
  options.extra_files[kReleaseManifestFileName] = release.manifest_json();
  absl::StatusOr<MergedModel> merged = MergeToCheckpoint(anchor_dir, modules, options, out, hashes);
  if (!merged.ok()) return merged.status();
  fs::remove_all(parts, ec);
  return merged;
}

}  // namespace

void AddReleaseCommands(CLI::App& app) {
  CLI::App* release = app.add_subcommand("release", "Releases: immutable sets of experts in router order; export as an HF checkpoint");
  release->require_subcommand(1);
  {
    struct O { Remote r; std::vector<std::string> exclude; int top_k = 0; std::string note; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = release->add_subcommand("build", "Record a new release of the current anchor's active experts");
    cmd->add_option("--exclude", o->exclude, "Active experts (owner/name) to leave out of this release");
    cmd->add_option("--k", o->top_k, "Experts per token (num_experts_per_tok); default: every expert")->check(CLI::NonNegativeNumber);
    cmd->add_option("--note", o->note, "A note kept with the release");
    o->r.AddOptions(cmd, true);
    cmd->callback([o] {
      auto client = o->r.Connect("release build");
      v1::BuildReleaseRequest req;
      for (const std::string& e : o->exclude) req.add_exclude(e);
      req.set_top_k(o->top_k);
      req.set_note(o->note);
      v1::Release r = Call<v1::BuildReleaseRequest, v1::Release>("release build", *client, &v1::Admin::Stub::BuildRelease, req);
      ReleaseManifest m = Parse("release build", r);
      if (o->r.json) std::cout << json::parse(r.manifest_json()).dump() << "\n";
      else PrintRelease(m, r.manifest_sha256());
    });
  }
  {
    auto r = std::make_shared<Remote>();
    CLI::App* cmd = release->add_subcommand("list", "List releases, oldest first");
    r->AddOptions(cmd, true);
    cmd->callback([r] {
      auto client = r->Connect("release list");
      auto resp = Call<v1::ListRequest, v1::ListReleasesResponse>("release list", *client, &v1::Admin::Stub::ListReleases, v1::ListRequest());
      json out = json::array();
      if (!r->json) std::cout << absl::StrFormat("%-10s %-17s %-14s %3s %3s  %s\n", "RELEASE", "CREATED", "ANCHOR", "E", "K", "EXPERTS");
      for (const v1::Release& rel : resp.releases()) {
        ReleaseManifest m = Parse("release list", rel);
        std::vector<std::string> ids;
        for (const ReleaseExpert& e : m.experts) ids.push_back(e.expert_id);
        if (r->json) {
          out.push_back({{"release_id", m.release_id}, {"created_unix", m.created_unix}, {"anchor_id", m.anchor_id},
                         {"num_experts", m.num_experts()}, {"top_k", m.top_k}, {"experts", ids},
                         {"manifest_sha256", rel.manifest_sha256()}});
        } else {
          std::cout << absl::StrFormat("%-10s %-17s %-14s %3d %3d  %s\n", m.release_id, When(m.created_unix), m.anchor_id.substr(0, 12),
                                       m.num_experts(), m.top_k, absl::StrJoin(ids, ", "));
        }
      }
      if (r->json) std::cout << out.dump(2) << "\n";
    });
  }
  {
    struct O { Remote r; std::string id; };
    auto o = std::make_shared<O>();
    CLI::App* cmd = release->add_subcommand("show", "Show a release's manifest (default: the newest)");
    cmd->add_option("release", o->id, "Release id (rel-NNNN)");
    o->r.AddOptions(cmd, true);
    cmd->callback([o] {
      auto client = o->r.Connect("release show");
      const auto [r, m] = FetchRelease("release show", *client, o->id);
      if (o->r.json) std::cout << r.manifest_json();
      else PrintRelease(m, r.manifest_sha256());
    });
  }
  {
    struct O {
      Remote r;
      std::string id, out, anchor;
      uint64_t max_shard_mib = kDefaultMaxShardBytes >> 20;
      HeldOutText held_out{{}, 256, 32, DefaultTokenCacheDir()};
    };
    auto o = std::make_shared<O>();
    CLI::App* cmd = release->add_subcommand("export", "Download a release's anchor and modules, verify them and write the merged HF checkpoint");
    cmd->add_option("release", o->id, "Release id (rel-NNNN)")->required();
    cmd->add_option("dir", o->out, "Output directory (must not exist)")->required();
    cmd->add_option("--anchor", o->anchor, "A local copy of the release's anchor (checked by its id) instead of downloading it")
        ->check(CLI::ExistingDirectory);
    cmd->add_option("--max-shard-mib", o->max_shard_mib, "Shard the safetensors past this size")->check(CLI::PositiveNumber);
    AddHeldOutOptions(cmd, &o->held_out);
    o->r.AddOptions(cmd, false);
    cmd->callback([o] {
      auto client = o->r.Connect("release export");
      const auto [r, m] = FetchRelease("release export", *client, o->id);
      absl::StatusOr<MergedModel> merged = Export(*client, r, m, o->anchor, o->out, o->max_shard_mib << 20);
      if (!merged.ok()) Fail("release export", merged.status());
      std::cout << absl::StrFormat("exported %s to %s: flex_olmo, %d experts, k = %d\n", m.release_id, o->out, m.num_experts(), m.top_k);
      absl::StatusOr<std::string> exactness = HfExactnessLine(merged->model, o->out, o->held_out);
      if (!exactness.ok()) Fail("release export", exactness.status());
      std::cout << *exactness << "\n";
    });
  }
}

}  // namespace flexfed::cli
