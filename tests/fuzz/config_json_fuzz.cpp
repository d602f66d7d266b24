// libFuzzer target for config.json (ModelConfig::FromJson, common/core/model_config.cpp): what an
// anchor's or a user's checkpoint carries. Besides crashes and sanitizer reports it checks that an
// accepted config survives its own round trip (ToJson, then FromJson again, the same JSON).
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/core/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  absl::StatusOr<flexfed::ModelConfig> config = flexfed::ModelConfig::FromJson(j, "fuzz");
  if (!config.ok()) return 0;
  const nlohmann::json written = config->ToJson();
  absl::StatusOr<flexfed::ModelConfig> again = flexfed::ModelConfig::FromJson(written, "fuzz again");
  if (!again.ok() || again->ToJson() != written) std::abort();
  return 0;
}
