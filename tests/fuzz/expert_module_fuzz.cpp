// libFuzzer target for an expert module's metadata and privacy record (ValidateExpertModule and
// CheckPrivacyRecord, common/core/expert_module.cpp): the part of an owner's upload that is text.
// The input is the safetensors metadata as a JSON object of strings; the harness gives it valid
// tensors for a tiny anchor, writes the module to a memory file and validates it, so the fuzzer
// spends its time in the metadata and the privacy record rather than in the safetensors header
// (which safetensors_fuzz covers). An input that is not such an object is checked as a privacy
// record alone. An accepted module's record must pass the record check again, and its numbers
// must be the ones the policy reads.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "common/core/expert_module.h"
#include "common/core/safetensors.h"

namespace {

const flexfed::ModelConfig& TinyConfig() {
  static const flexfed::ModelConfig config = [] {
    nlohmann::json j = {{"model_type", "flex_olmo"}, {"vocab_size", 16}, {"hidden_size", 4}, {"intermediate_size", 8},
                        {"num_hidden_layers", 1}, {"num_attention_heads", 1}, {"num_key_value_heads", 1},
                        {"num_experts", 1}, {"num_experts_per_tok", 1}, {"max_position_embeddings", 32}};
    absl::StatusOr<flexfed::ModelConfig> c = flexfed::ModelConfig::FromJson(j, "tiny");
    if (!c.ok()) {
      std::fprintf(stderr, "%s\n", std::string(c.status().message()).c_str());
      std::abort();
    }
    return *c;
  }();
  return config;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  std::map<std::string, std::string> metadata;
  bool strings = j.is_object();
  if (strings) {
    for (const auto& [key, value] : j.items()) {
      if (!value.is_string()) strings = false;
      else metadata[key] = value.get<std::string>();
    }
  }
  if (!strings) {
    (void)flexfed::CheckPrivacyRecord(text);
    return 0;
  }
  const flexfed::ModelConfig& config = TinyConfig();
  // Without a config_hash of its own the input gets the tiny anchor's, so that it reaches the
  // checks after the config's.
  metadata.emplace("config_hash", flexfed::ConfigHash(config));
  std::vector<flexfed::TensorInfo> tensors;
  uint64_t offset = 0;
  for (const flexfed::AllowedTensor& a : flexfed::ExpertModuleAllowList(config, flexfed::Dtype::kF32, false)) {
    flexfed::TensorInfo t;
    t.name = a.name;
    t.dtype = a.dtype;
    t.shape = a.shape;
    t.begin = offset;
    t.end = offset + *flexfed::TensorByteSize(a.shape, a.dtype);
    offset = t.end;
    tensors.push_back(t);
  }
  absl::StatusOr<std::string> header = flexfed::BuildSafetensorsHeader(tensors, metadata);
  if (!header.ok()) return 0;
  const int fd = memfd_create("module", MFD_CLOEXEC);
  if (fd < 0) std::abort();
  const std::string file = *header + std::string(offset, '\0');
  if (write(fd, file.data(), file.size()) != static_cast<ssize_t>(file.size())) std::abort();
  absl::StatusOr<flexfed::ExpertModuleMetadata> m =
      flexfed::ValidateExpertModule("/proc/self/fd/" + std::to_string(fd), config, flexfed::Dtype::kF32, "");
  close(fd);
  if (!m.ok()) return 0;
  if (m->tokens_trained < 0 || m->anchor_sha256.size() != 64) std::abort();
  if (!m->privacy.empty() && !flexfed::CheckPrivacyRecord(m->privacy).ok()) std::abort();
  if (const std::optional<double> rate = flexfed::ExtractionRate(*m); rate && !(*rate >= 0 && *rate <= 1)) std::abort();
  return 0;
}
