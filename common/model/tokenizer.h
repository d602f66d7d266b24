// Tokenizers: text ↔ token ids. The byte-level tokenizer of the `test`, `tiny` and `small` models,
// and Hugging Face tokenizer.json BPE tokenizers (the dolma2 tokenizer of real OLMo-2 anchors;
// common/model/hf_tokenizer.h) behind the same interface.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Identifies the vocabulary exactly (token caches are keyed by it), e.g. "bytes-v1".
  virtual std::string id() const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual int32_t pad_id() const = 0;
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;  // no BOS/EOS added
  // Special tokens decode to nothing; the result may end inside a UTF-8 sequence.
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;
  // UTF-8 bytes token `id` stands for (0 for special tokens): the denominator of bits per byte.
  virtual int64_t TokenBytes(int32_t id) const = 0;
};

// 256 byte values, then BOS = 256, EOS = 257, PAD = 258: vocabulary 259.
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kBos = 256, kEos = 257, kPad = 258, kVocab = 259;
  std::string id() const override { return "bytes-v1"; }
  int64_t vocab_size() const override { return kVocab; }
  int32_t bos_id() const override { return kBos; }
  int32_t eos_id() const override { return kEos; }
  int32_t pad_id() const override { return kPad; }
  std::vector<int32_t> Encode(std::string_view text) const override;
  std::string Decode(const std::vector<int32_t>& ids) const override;
  int64_t TokenBytes(int32_t id) const override { return id >= 0 && id < 256 ? 1 : 0; }
};

// The tokenizer a model directory uses: its Hugging Face `tokenizer.json` when present; else
// `flexfed_tokenizer.json` ({"type": "bytes"}); else inferred from the vocabulary (259 = bytes).
// `vocab_size` is the model's, and must cover the tokenizer's ids (it may be padded beyond them).
absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerForModel(const std::string& model_dir, int64_t vocab_size);

// Where invalid UTF-8 starts in `text`, or npos when it is all valid.
size_t FindInvalidUtf8(std::string_view text);

}  // namespace flexfed
