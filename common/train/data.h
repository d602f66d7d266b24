// Training data: text files → documents → tokens (cached on disk) → packed training sequences.
// The on-disk token cache is a safetensors file; see docs/DATA.md.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/checkpoint.h"
#include "common/model/tokenizer.h"
#include "common/train/documents.h"

namespace flexfed {

// Where token caches live by default: $FLEXFED_CACHE_DIR/tokens, else $XDG_CACHE_HOME/flexfed/tokens,
// else ~/.cache/flexfed/tokens.
std::string DefaultTokenCacheDir();

// A tokenised corpus, memory-mapped from the token cache. Copies share the mapping.
class TokenCorpus {
 public:
  // Tokenises `inputs`, or reuses `cache_dir/<key>.tokens.safetensors` where the key is the
  // SHA-256 of the inputs' bytes (in visiting order), the tokenizer id and the options: the same
  // data reads from the cache however its files are named or touched. `cache_hit` reports which.
  static absl::StatusOr<TokenCorpus> Build(const std::vector<std::string>& inputs, const Tokenizer& tokenizer,
                                           const CorpusOptions& options, const std::string& cache_dir,
                                           bool* cache_hit = nullptr);
  static absl::StatusOr<TokenCorpus> Open(const std::string& path);

  int64_t num_documents() const { return offsets_.size(0) - 1; }
  int64_t num_tokens() const { return tokens_.size(0); }
  int64_t num_bytes() const { return num_bytes_; }  // UTF-8 bytes of the text, for bits per byte
  const int32_t* tokens() const { return tokens_.data_ptr<int32_t>(); }
  const int64_t* doc_offsets() const { return offsets_.data_ptr<int64_t>(); }  // [documents + 1]
  int64_t document_length(int64_t d) const { return doc_offsets()[d + 1] - doc_offsets()[d]; }
  const std::string& key() const { return key_; }
  const std::string& path() const { return path_; }

 private:
  std::shared_ptr<const SafetensorsFile> file_;
  at::Tensor tokens_;   // [tokens] int32, zero-copy view of the file
  at::Tensor offsets_;  // [documents + 1] int64
  int64_t num_bytes_ = 0;
  std::string key_, path_;
};

// A deterministic permutation of [0, n) for `seed`: SplitMix64-driven Fisher–Yates, identical on
// every platform and standard library.
std::vector<int64_t> Permutation(int64_t n, uint64_t seed);

struct DocumentSplit {
  std::vector<int64_t> train;       // document ids
  std::vector<int64_t> validation;  // document ids
};
// Shuffles documents with `seed` and holds out ceil(fraction · n) of them (at least one when
// fraction > 0 and n ≥ 2) for validation.
DocumentSplit SplitDocuments(int64_t num_documents, double validation_fraction, uint64_t seed);

// Documents packed into training sequences: each document's tokens followed by EOS, concatenated
// in the given order, cut into windows of seq_len + 1 tokens that overlap by one (inputs =
// window[:-1], targets = window[1:]). The incomplete tail is dropped. Nothing is copied up front;
// a window is assembled from the mapped tokens when asked for.
class PackedSequences {
 public:
  PackedSequences(TokenCorpus corpus, std::vector<int64_t> documents, int64_t seq_len, int32_t eos_id);

  int64_t size() const { return num_sequences_; }
  int64_t seq_len() const { return seq_len_; }
  int64_t stream_tokens() const { return stream_starts_.empty() ? 0 : stream_starts_.back(); }
  // Writes the seq_len + 1 tokens of sequence i to `out`.
  void Copy(int64_t i, int32_t* out) const;
  // Sequences `indices` as a [B, seq_len + 1] int64 tensor.
  at::Tensor Batch(const std::vector<int64_t>& indices) const;

 private:
  TokenCorpus corpus_;
  std::vector<int64_t> documents_;
  std::vector<int64_t> stream_starts_;  // [documents + 1]: where each document starts in the stream
  int64_t seq_len_;
  int32_t eos_id_;
  int64_t num_sequences_ = 0;
};

}  // namespace flexfed
