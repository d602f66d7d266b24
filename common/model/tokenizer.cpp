#include "common/model/tokenizer.h"

#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/model/hf_tokenizer.h"
#include <nlohmann/json.hpp>

namespace flexfed {

std::vector<int32_t> ByteTokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<uint8_t>(text[i]);
  return ids;
}

std::string ByteTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int32_t id : ids) {
    if (id >= 0 && id < 256) out.push_back(static_cast<char>(id));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerForModel(const std::string& model_dir, int64_t vocab_size) {
  if (!model_dir.empty() && std::filesystem::exists(std::filesystem::path(model_dir) / kHfTokenizerFile)) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> hf = LoadHfTokenizer(model_dir);
    if (!hf.ok()) return hf.status();
    if ((*hf)->vocab_size() > vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir, ": the tokenizer's ids reach ", (*hf)->vocab_size() - 1,
                                                     " but the model's vocabulary has ", vocab_size,
                                                     " rows; use the tokenizer.json the model was trained with"));
    }
    return hf;
  }
  const std::string path = (std::filesystem::path(model_dir) / "flexfed_tokenizer.json").string();
  std::string type = vocab_size == ByteTokenizer::kVocab ? "bytes" : "";
  if (std::filesystem::exists(path)) {
    absl::StatusOr<std::string> text = ReadFile(path);
    if (!text.ok()) return text.status();
    nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("type") || !j["type"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": expected {\"type\": \"bytes\"}"));
    }
    type = j["type"].get<std::string>();
  }
  if (type != "bytes") {
    return absl::UnimplementedError(absl::StrCat(
        model_dir, ": no tokenizer FlexFed can use (vocabulary ", vocab_size, "): put the model's ", kHfTokenizerFile,
        " (and ", kHfTokenizerConfigFile, ") beside it, or pass token ids directly"));
  }
  if (vocab_size < ByteTokenizer::kVocab) {
    return absl::InvalidArgumentError(absl::StrCat(model_dir, ": vocabulary ", vocab_size,
                                                   " is smaller than the byte tokenizer's 259"));
  }
  return std::unique_ptr<Tokenizer>(new ByteTokenizer());
}

size_t FindInvalidUtf8(std::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      const uint8_t cc = static_cast<uint8_t>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3F);
    }
    // Reject overlong forms, surrogates and code points past U+10FFFF.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
      return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

}  // namespace flexfed
