// Hugging Face `tokenizer.json` tokenizers, as real OLMo-2 / FlexOlmo anchors ship them (the dolma2
// tokenizer: byte-level BPE with a cl100k-style pre-tokenizer regex). Format: docs/TOKENIZERS.md.
//
// What is supported, exactly as the `tokenizers` library computes it (tests/common/model/
// hf_tokenizer_test.cpp checks parity on tokenizers that library trains at test time):
//   normalizer     null, NFC, or a Sequence of those
//   added tokens   matched before pre-tokenization, leftmost-longest; special, lstrip, rstrip,
//                  single_word and normalized honoured
//   pre_tokenizer  Split (Regex or String pattern; every behaviour; invert), ByteLevel
//                  (add_prefix_space, use_regex), Sequence of those
//   model          BPE over the byte-level alphabet (merges as "a b" strings or pairs, ignore_merges)
//   decoder        ByteLevel (or null)
// Anything else is refused when the file is loaded, with a message that names the field. Regular
// expressions run on PCRE2 with UTF and Unicode properties (JIT-compiled); NFC comes from utf8proc.
// Torch-free. Thread-safe: Encode and Decode may run concurrently (corpus tokenization does).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/model/tokenizer.h"

namespace flexfed {

inline constexpr char kHfTokenizerFile[] = "tokenizer.json";
inline constexpr char kHfTokenizerConfigFile[] = "tokenizer_config.json";

// Loads `dir`/tokenizer.json and, when present, `dir`/tokenizer_config.json (bos_token, eos_token,
// pad_token; without a pad token the EOS id pads, without a BOS token the EOS id starts documents).
// The tokenizer's id() is "hf:" + the SHA-256 of tokenizer.json: token caches key on it.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& dir);

}  // namespace flexfed
