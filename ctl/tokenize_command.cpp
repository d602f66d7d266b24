#include "ctl/tokenize_command.h"

#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "ctl/inference_commands.h"
#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/core/model_config.h"
#include "common/model/tokenizer.h"
#include <nlohmann/json.hpp>

namespace flexfed::cli {
namespace {

namespace fs = std::filesystem;

struct TokenizeOptions {
  std::string model;
  std::vector<std::string> texts;
  std::string file;
  bool json = false;
};

// A piece for display: its bytes, with what is not printable or not valid UTF-8 escaped.
std::string Printable(const std::string& bytes) {
  std::string out;
  for (size_t i = 0; i < bytes.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(bytes[i]);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7F) {
      out += absl::StrCat("\\x", absl::Hex(c, absl::kZeroPad2));
    } else if (c >= 0x80) {
      const size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      const std::string_view seq = std::string_view(bytes).substr(i, len);
      if (seq.size() == len && len > 1 && FindInvalidUtf8(seq) == std::string_view::npos) {
        out += seq;  // a whole character
        i += len - 1;
      } else {
        out += absl::StrCat("\\x", absl::Hex(c, absl::kZeroPad2));
      }
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  return out;
}

absl::Status Run(const TokenizeOptions& o) {
  // The model's vocabulary bounds the tokenizer's ids; a bare tokenizer folder has no such bound.
  int64_t vocab = std::numeric_limits<int32_t>::max();
  if (fs::exists(fs::path(o.model) / "config.json")) {
    absl::StatusOr<ModelConfig> config = ReadModelConfig((fs::path(o.model) / "config.json").string());
    if (!config.ok()) return config.status();
    vocab = config->vocab_size;
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = TokenizerForModel(o.model, vocab);
  if (!tok.ok()) return tok.status();
  std::vector<std::string> texts = o.texts;
  if (!o.file.empty()) {
    absl::StatusOr<std::string> text = ReadFile(o.file);
    if (!text.ok()) return text.status();
    texts.push_back(*text);
  }
  if (texts.empty()) return absl::InvalidArgumentError("no input: give --text TEXT or --file FILE");
  nlohmann::json out = {{"tokenizer", (*tok)->id()}, {"vocab_size", (*tok)->vocab_size()}, {"texts", nlohmann::json::array()}};
  for (const std::string& text : texts) {
    const std::vector<int32_t> ids = (*tok)->Encode(text);
    std::vector<std::string> pieces;
    for (int32_t id : ids) pieces.push_back((*tok)->Decode({id}));
    const std::string decoded = (*tok)->Decode(ids);
    if (o.json) {
      out["texts"].push_back({{"text", text}, {"ids", ids}, {"pieces", pieces}, {"decoded", decoded},
                              {"round_trip", decoded == text}});
      continue;
    }
    std::cout << ids.size() << " tokens for " << text.size() << " bytes"
              << (decoded == text ? "" : " (decoding gives different text: normalized, or special tokens)") << "\n";
    for (size_t i = 0; i < ids.size(); ++i) std::cout << "  " << ids[i] << "\t'" << Printable(pieces[i]) << "'\n";
  }
  if (o.json) std::cout << out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  return absl::OkStatus();
}

}  // namespace

void AddTokenizeCommand(CLI::App& app) {
  auto o = std::make_shared<TokenizeOptions>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Show the token ids and pieces a model's tokenizer makes of some text");
  cmd->footer("Example:\n  flexfedctl tokenize anchor/ --text 'Hello, world' --json");
  cmd->add_option("model", o->model, "Model or tokenizer directory (tokenizer.json, or the byte tokenizer's model)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--text", o->texts, "Text to tokenize (repeat for several)");
  cmd->add_option("--file", o->file, "Tokenize this file's contents")->check(CLI::ExistingFile);
  cmd->add_flag("--json", o->json, "Print JSON: ids, pieces, decoded text, whether it round-trips");
  cmd->callback([o] { ExitOnError("tokenize", Run(*o)); });
}

}  // namespace flexfed::cli
