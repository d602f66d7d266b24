#include "ctl/random_checkpoint_command.h"

#include <chrono>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "ctl/inference_commands.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/core/file_util.h"
#include "common/core/model_config.h"
#include "common/merge/merge.h"
#include "common/model/hf_tokenizer.h"
#include "common/model/model.h"
#include "common/model/tokenizer.h"
#include <nlohmann/json.hpp>

namespace flexfed::cli {
namespace {

namespace fs = std::filesystem;

struct Options {
  std::string size, out, tokenizer, dtype = "bfloat16";
  uint64_t seed = 0;
  int64_t vocab_size = 0;
  uint64_t max_shard_mib = kDefaultMaxShardBytes >> 20;
  bool json = false;
};

absl::Status Run(const Options& o) {
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<ModelConfig> config = ModelConfig::Preset(o.size);
  if (!config.ok()) return config.status();
  if (o.vocab_size > 0) config->vocab_size = o.vocab_size;
  if (!o.tokenizer.empty()) {
    // The tokenizer's special ids go into config.json (generation stops at its EOS).
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = LoadHfTokenizer(o.tokenizer);
    if (!tok.ok()) return tok.status();
    if ((*tok)->vocab_size() > config->vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(o.tokenizer, ": the tokenizer has ", (*tok)->vocab_size(), " tokens but a ",
                                                     o.size, " model has ", config->vocab_size, " rows; choose a larger --size or --vocab-size"));
    }
    config->bos_token_id.reset();
    if ((*tok)->bos_id() != (*tok)->eos_id()) config->bos_token_id = (*tok)->bos_id();
    config->eos_token_ids = {(*tok)->eos_id()};
    config->pad_token_id = (*tok)->pad_id();
  }
  const at::ScalarType dtype = o.dtype == "float32" ? at::kFloat : at::kBFloat16;
  if (absl::Status s = WriteRandomCheckpoint(o.out, *config, dtype, o.seed, o.max_shard_mib << 20); !s.ok()) return s;
  if (!o.tokenizer.empty()) {
    for (const std::string& name : TokenizerFileNames()) {
      const fs::path src = fs::path(o.tokenizer) / name;
      std::error_code ec;
      if (!fs::exists(src, ec)) continue;
      absl::StatusOr<std::string> bytes = ReadFile(src.string());
      if (!bytes.ok()) return bytes.status();
      if (absl::Status s = WriteFileAtomically((fs::path(o.out) / name).string(), *bytes); !s.ok()) return s;
    }
  }
  uint64_t bytes = 0;
  for (const auto& entry : fs::directory_iterator(o.out)) bytes += entry.is_regular_file() ? entry.file_size() : 0;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (o.json) {
    std::cout << nlohmann::json({{"out", o.out}, {"size", o.size}, {"dtype", o.dtype}, {"bytes", bytes}, {"seconds", seconds}}).dump()
              << "\n";
  } else {
    std::cout << absl::StrFormat("wrote a random %s checkpoint (%s, %.2f GB) to %s in %.1f s\n", o.size, o.dtype, bytes / 1e9,
                                 o.out, seconds);
  }
  return absl::OkStatus();
}

}  // namespace

void AddRandomCheckpointCommand(CLI::App& app) {
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "random-checkpoint", "Write an OLMo-2-shaped checkpoint of a preset size with random weights (for trials at real size)");
  cmd->footer("Example (a 1B-shaped anchor with a real tokenizer; add r_pub with `flexfed-owner router-init --public`):\n"
              "  flexfedctl random-checkpoint --size 1b --tokenizer olmo2-tokenizer/ --out anchor-1b/");
  cmd->add_option("--size", o->size, "test, mini, tiny, small, 1b (hidden 2048, 16 layers) or 7b (hidden 4096, 32 layers)")->required();
  cmd->add_option("--out,-o", o->out, "Output directory (must not exist)")->required();
  cmd->add_option("--tokenizer", o->tokenizer, "A folder with tokenizer.json (and tokenizer_config.json ...) to copy beside it")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--dtype", o->dtype, "Weights dtype")->check(CLI::IsMember({"bfloat16", "float32"}));
  cmd->add_option("--vocab-size", o->vocab_size, "Embedding rows instead of the size's (at least the tokenizer's tokens)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", o->seed, "Seed of the weights");
  cmd->add_option("--max-shard-mib", o->max_shard_mib, "Shard the safetensors past this size")->check(CLI::PositiveNumber);
  cmd->add_flag("--json", o->json, "Print JSON: out, size, dtype, bytes, seconds");
  cmd->callback([o] { ExitOnError("random-checkpoint", Run(*o)); });
}

}  // namespace flexfed::cli
