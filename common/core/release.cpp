#include "common/core/release.h"

#include <cctype>
#include <cstdint>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace flexfed {
namespace {

bool IsSha256Hex(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c)) && (c < 'a' || c > 'f')) return false;
  }
  return true;
}

}  // namespace

std::string ReleaseIdForNumber(int64_t number) { return absl::StrFormat("rel-%04d", number); }

bool IsValidReleaseId(const std::string& id) {
  if (id.size() < 8 || id.size() > 24 || id.rfind("rel-", 0) != 0) return false;
  for (size_t i = 4; i < id.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(id[i]))) return false;
  }
  return true;
}

std::string ReleaseManifest::ToJson() const {
  nlohmann::json experts_json = nlohmann::json::array();
  for (const ReleaseExpert& e : experts) {
    experts_json.push_back({{"index", e.index},
                            {"expert_id", e.expert_id},
                            {"owner_id", e.owner_id},
                            {"name", e.name},
                            {"domain", e.domain},
                            {"module_sha256", e.module_sha256},
                            {"module_size", e.module_size},
                            {"tokens_trained", e.tokens_trained}});
  }
  const nlohmann::json j = {{"format", kReleaseFormat},  {"release_id", release_id}, {"anchor_id", anchor_id},
                            {"num_experts", num_experts()}, {"top_k", top_k},        {"experts", experts_json},
                            {"excluded", excluded},        {"created_unix", created_unix}, {"note", note}};
  return j.dump(2) + "\n";
}

absl::StatusOr<ReleaseManifest> ReleaseManifest::FromJson(const std::string& text, const std::string& source) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a valid release manifest: ", what));
  };
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  // (Any type may stand where a string belongs: nothing here may throw on it.)
  if (!j.contains("format") || !j["format"].is_string() || j["format"].get<std::string>() != kReleaseFormat) {
    return bad(absl::StrCat("\"format\" is not \"", kReleaseFormat, "\""));
  }
  ReleaseManifest m;
  // Integers only where integers belong: nlohmann's get<int64_t> of 1.8e26 is undefined behaviour.
  struct BadField {
    std::string what;
  };
  auto integer = [](const nlohmann::json& o, const char* key, std::optional<int64_t> fallback = std::nullopt) -> int64_t {
    if (!o.is_object() || !o.contains(key)) {
      if (fallback) return *fallback;
      throw BadField{absl::StrCat("no \"", key, "\"")};
    }
    const nlohmann::json& v = o[key];
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
      throw BadField{absl::StrCat("\"", key, "\" is not an integer")};
    }
    return v.get<int64_t>();
  };
  try {
    m.release_id = j.at("release_id").get<std::string>();
    m.anchor_id = j.at("anchor_id").get<std::string>();
    m.top_k = integer(j, "top_k");
    m.created_unix = integer(j, "created_unix");
    m.note = j.value("note", "");
    m.excluded = j.value("excluded", std::vector<std::string>{});
    for (const nlohmann::json& e : j.at("experts")) {
      m.experts.push_back({integer(e, "index"), e.at("expert_id").get<std::string>(), e.at("owner_id").get<std::string>(),
                           e.at("name").get<std::string>(), e.value("domain", ""), e.at("module_sha256").get<std::string>(),
                           integer(e, "module_size"), integer(e, "tokens_trained", 0)});
    }
    if (integer(j, "num_experts") != m.num_experts()) return bad("\"num_experts\" disagrees with the expert list");
  } catch (const nlohmann::json::exception& e) {
    return bad(e.what());
  } catch (const BadField& e) {
    return bad(e.what);
  }
  if (!IsValidReleaseId(m.release_id)) return bad(absl::StrCat("release id '", m.release_id, "'"));
  if (!IsSha256Hex(m.anchor_id)) return bad("\"anchor_id\" is not a SHA-256 hex digest");
  if (m.experts.empty()) return bad("no experts");
  for (size_t i = 0; i < m.experts.size(); ++i) {
    const ReleaseExpert& e = m.experts[i];
    if (e.index != static_cast<int64_t>(i) + 1) return bad(absl::StrCat("expert ", e.expert_id, " has index ", e.index, ", expected ", i + 1));
    if (!IsSha256Hex(e.module_sha256)) return bad(absl::StrCat("expert ", e.expert_id, ": module_sha256 is not a SHA-256 hex digest"));
    if (e.module_size <= 0) return bad(absl::StrCat("expert ", e.expert_id, ": module_size must be positive"));
  }
  if (m.top_k < 1 || m.top_k > m.num_experts()) return bad(absl::StrCat("top_k ", m.top_k, " is outside 1..", m.num_experts()));
  return m;
}

}  // namespace flexfed
