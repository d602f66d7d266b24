#include "ctl/logits_command.h"

#include <ATen/Parallel.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/status/status.h"
#include "ctl/inference_commands.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model/checkpoint.h"
#include "common/core/file_util.h"
#include "common/model/model.h"
#include "common/model/tokenizer.h"
#include <nlohmann/json.hpp>

namespace flexfed::cli {
namespace {

namespace fs = std::filesystem;

struct LogitsOptions {
  std::string model_dir;
  std::vector<std::string> ids;  // "1,2,3" per sequence
  std::string ids_file;
  std::vector<std::string> texts;
  std::string out;
  std::vector<int64_t> exclude;
  std::vector<int64_t> allow;
  std::string dtype = "auto";
  int threads = 0;
  bool json = false;
};

absl::StatusOr<std::vector<int64_t>> ParseIdList(const std::string& text, const std::string& where) {
  std::vector<int64_t> ids;
  std::string token;
  std::istringstream in(text);
  while (in >> token) {
    std::istringstream parts(token);
    std::string part;
    while (std::getline(parts, part, ',')) {
      if (part.empty()) continue;
      size_t used = 0;
      int64_t v = 0;
      try {
        v = std::stoll(part, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != part.size()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": '", part, "' is not a token id (use integers separated by commas or spaces)"));
      }
      ids.push_back(v);
    }
  }
  return ids;
}

// Sequences from --ids, --ids-file (text: one sequence per line; or safetensors with an integer
// `ids` tensor [B, T]) and --text.
absl::StatusOr<std::vector<std::vector<int64_t>>> GatherSequences(const LogitsOptions& o, const std::string& model_dir,
                                                                  int64_t vocab) {
  std::vector<std::vector<int64_t>> seqs;
  for (size_t i = 0; i < o.ids.size(); ++i) {
    absl::StatusOr<std::vector<int64_t>> ids = ParseIdList(o.ids[i], absl::StrCat("--ids #", i + 1));
    if (!ids.ok()) return ids.status();
    seqs.push_back(*std::move(ids));
  }
  if (!o.ids_file.empty()) {
    if (fs::path(o.ids_file).extension() == ".safetensors") {
      absl::StatusOr<std::shared_ptr<const SafetensorsFile>> f = SafetensorsFile::Open(o.ids_file);
      if (!f.ok()) return f.status();
      absl::StatusOr<at::Tensor> t = (*f)->Get("ids");
      if (!t.ok() || t->dim() != 2 || !at::isIntegralType(t->scalar_type(), /*includeBool=*/false)) {
        return absl::InvalidArgumentError(absl::StrCat(o.ids_file, ": needs an integer tensor 'ids' of shape [batch, tokens]"));
      }
      at::Tensor ids = t->to(at::kLong).contiguous();
      for (int64_t b = 0; b < ids.size(0); ++b) {
        const int64_t* row = ids[b].data_ptr<int64_t>();
        seqs.emplace_back(row, row + ids.size(1));
      }
    } else {
      absl::StatusOr<std::string> text = ReadFile(o.ids_file);
      if (!text.ok()) return text.status();
      std::istringstream lines(*text);
      std::string line;
      for (int n = 1; std::getline(lines, line); ++n) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        absl::StatusOr<std::vector<int64_t>> ids = ParseIdList(line, absl::StrCat(o.ids_file, ":", n));
        if (!ids.ok()) return ids.status();
        seqs.push_back(*std::move(ids));
      }
    }
  }
  if (!o.texts.empty()) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = TokenizerForModel(model_dir, vocab);
    if (!tok.ok()) return tok.status();
    for (const std::string& text : o.texts) {
      std::vector<int32_t> ids = (*tok)->Encode(text);
      seqs.emplace_back(ids.begin(), ids.end());
    }
  }
  if (seqs.empty()) return absl::InvalidArgumentError("no input: give --ids, --ids-file or --text");
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].empty()) return absl::InvalidArgumentError(absl::StrCat("sequence ", i + 1, " is empty"));
    for (int64_t id : seqs[i]) {
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i + 1, ": token id ", id,
                                                       " is outside the model's vocabulary [0, ", vocab, ")"));
      }
    }
  }
  return seqs;
}

absl::Status RunLogits(const LogitsOptions& o) {
  SetCpuThreads(o.threads);
  std::optional<at::ScalarType> dtype;
  if (o.dtype == "float32") dtype = at::kFloat;
  if (o.dtype == "bfloat16") dtype = at::kBFloat16;
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<FlexOlmoModel> model = FlexOlmoModel::Load(o.model_dir, dtype);
  if (!model.ok()) return model.status();
  const ModelConfig& config = model->config();

  absl::StatusOr<std::vector<std::vector<int64_t>>> seqs = GatherSequences(o, o.model_dir, config.vocab_size);
  if (!seqs.ok()) return seqs.status();

  absl::StatusOr<Routing> routing = Routing::FromLists(config.num_experts, o.exclude, o.allow);
  if (!routing.ok()) return routing.status();

  // Right-pad to the longest sequence: causal attention keeps padding from touching real positions.
  int64_t longest = 0;
  for (const auto& s : *seqs) longest = std::max<int64_t>(longest, static_cast<int64_t>(s.size()));
  if (longest > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("a sequence of ", longest, " tokens exceeds max_position_embeddings (",
                                                   config.max_position_embeddings, ")"));
  }
  const int64_t batch = static_cast<int64_t>(seqs->size());
  at::Tensor ids = at::full({batch, longest}, config.pad_token_id.value_or(0), at::kLong);
  at::Tensor lengths = at::empty({batch}, at::kLong);
  for (int64_t b = 0; b < batch; ++b) {
    const auto& s = (*seqs)[b];
    std::copy(s.begin(), s.end(), ids[b].data_ptr<int64_t>());
    lengths[b] = static_cast<int64_t>(s.size());
  }

  at::Tensor logits;
  {
    c10::InferenceMode inference;
    logits = model->Forward(ids, *routing).to(at::kFloat);
  }
  std::vector<std::string> allowed_ids;
  for (int64_t e = 0; e < config.num_experts; ++e) {
    if (routing->allowed.empty() || routing->allowed[e]) allowed_ids.push_back(std::to_string(e));
  }
  std::map<std::string, std::string> metadata = {
      {"model_type", config.model_type},
      {"weights_dtype", TorchDtypeName(model->dtype())},
      {"allowed_experts", absl::StrJoin(allowed_ids, ",")},
      {"padding", "right; positions past each sequence's length hold logits of padding"}};
  // The texts that were tokenised (they follow the --ids and --ids-file sequences), so a checker can
  // tokenise them again with another tokenizer (tests/oracle/hf_release_logits.py).
  if (!o.texts.empty()) metadata["texts"] = nlohmann::json(o.texts).dump();
  if (absl::Status s = WriteSafetensors(o.out, {{"logits", logits}, {"ids", ids}, {"lengths", lengths}}, metadata); !s.ok()) {
    return s;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (o.json) {
    nlohmann::json j = {{"out", o.out},
                        {"shape", {batch, longest, config.vocab_size}},
                        {"model_type", config.model_type},
                        {"weights_dtype", TorchDtypeName(model->dtype())},
                        {"allowed_experts", allowed_ids},
                        {"seconds", seconds}};
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "wrote logits [" << batch << ", " << longest << ", " << config.vocab_size << "] (F32) to " << o.out
              << " in " << seconds << " s; experts used: " << absl::StrJoin(allowed_ids, ",") << "\n";
  }
  return absl::OkStatus();
}

}  // namespace

void AddLogitsCommand(CLI::App& app) {
  auto o = std::make_shared<LogitsOptions>();
  CLI::App* cmd = app.add_subcommand("logits", "Run a checkpoint on token ids and write the logits to a safetensors file");
  cmd->footer(
      "Output tensors: logits F32 [batch, tokens, vocab], ids I64 [batch, tokens] (right-padded),\n"
      "lengths I64 [batch]. Example:\n"
      "  flexfedctl logits ckpt/ --ids 1,2,3 --ids 4,5,6 --exclude 2 --out logits.safetensors");
  cmd->add_option("model", o->model_dir, "Checkpoint directory (config.json + safetensors; olmo2 or flex_olmo)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--ids", o->ids, "One sequence of token ids, comma- or space-separated (repeat for a batch)");
  cmd->add_option("--ids-file", o->ids_file,
                  "File of sequences: text with one sequence per line, or .safetensors with an integer 'ids' [batch, tokens]")
      ->check(CLI::ExistingFile);
  cmd->add_option("--text", o->texts, "Text to tokenise with the model's tokenizer (repeat for a batch)");
  cmd->add_option("--out,-o", o->out, "Output safetensors file")->required();
  auto* exclude = cmd->add_option("--exclude", o->exclude, "Experts to opt out of (ids, e.g. --exclude 2 3)");
  cmd->add_option("--allow", o->allow, "Only these experts may be used (ids)")->excludes(exclude);
  cmd->add_option("--dtype", o->dtype, "Weights dtype: auto (the checkpoint's), float32 or bfloat16")
      ->check(CLI::IsMember({"auto", "float32", "bfloat16"}));
  cmd->add_option("--threads", o->threads, "CPU threads (default: all cores)")->check(CLI::NonNegativeNumber);
  cmd->add_flag("--json", o->json, "Print a JSON summary instead of a sentence");
  cmd->callback([o] { ExitOnError("logits", RunLogits(*o)); });
}

}  // namespace flexfed::cli
