// Specification of release manifests (common/core/release.h): what FromJson accepts and refuses.
#include <catch2/catch.hpp>

#include "common/core/release.h"

namespace flexfed {
namespace {

// Found by tests/fuzz/release_manifest_fuzz.cpp: a "format" of another type threw out of FromJson
// (nlohmann's type_error) and ended the process that read the manifest.
TEST_CASE("a release manifest with fields of the wrong type is refused, not thrown on", "[release]") {
  for (const char* text : {R"({"format": 2})", R"({"format": null})", R"({"format": ["flexfed-release/1"]})",
                           R"({"format": "flexfed-release/1", "release_id": 7})",
                           R"({"format": "flexfed-release/1", "note": 1, "excluded": "x"})", R"([])", "", "{"}) {
    INFO(text);
    absl::StatusOr<ReleaseManifest> m = ReleaseManifest::FromJson(text, "manifest.json");
    CHECK(absl::IsInvalidArgument(m.status()));
    CHECK_THAT(std::string(m.status().message()), Catch::Contains("manifest.json: not a valid release manifest"));
  }
}

// Also the fuzzer's: an integer field holding 1.8e26 (a float) was converted to int64 (undefined).
TEST_CASE("a release manifest's integers must be integers", "[release]") {
  const std::string head = R"({"format": "flexfed-release/1", "release_id": "rel-0001", "anchor_id": ")" + std::string(64, 'c') +
                           R"(", "num_experts": 2, "top_k": 1, "experts": [{"index": 1, "expert_id": "a/m", "owner_id": "a",
                           "name": "m", "module_sha256": ")" + std::string(64, '1') + R"(", "module_size": 10}], "created_unix": )";
  CHECK(ReleaseManifest::FromJson(head + "1800000000}", "ok").ok());
  for (const char* value : {"1.8e26", "1.5", "18446744073709551615", "\"1800000000\"", "true"}) {
    INFO(value);
    absl::StatusOr<ReleaseManifest> m = ReleaseManifest::FromJson(head + value + "}", "manifest.json");
    CHECK(absl::IsInvalidArgument(m.status()));
    CHECK_THAT(std::string(m.status().message()), Catch::Contains("\"created_unix\" is not an integer"));
  }
}

}  // namespace
}  // namespace flexfed
