#include "common/train/data.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/core/sha256.h"
#include "common/train/documents.h"
#include <nlohmann/json.hpp>

namespace flexfed {

std::string DefaultTokenCacheDir() {
  if (const char* d = std::getenv("FLEXFED_CACHE_DIR")) return std::string(d) + "/tokens";
  if (const char* d = std::getenv("XDG_CACHE_HOME")) return std::string(d) + "/flexfed/tokens";
  const char* home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/flexfed/tokens";
}
namespace {

namespace fs = std::filesystem;

constexpr char kCacheFormat[] = "flexfed-tokens-v1";

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

absl::StatusOr<TokenCorpus> TokenCorpus::Open(const std::string& path) {
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  TokenCorpus c;
  c.file_ = *file;
  c.path_ = path;
  const auto& meta = c.file_->metadata();
  auto format = meta.find("format");
  auto bytes = meta.find("text_bytes");
  auto key = meta.find("key");
  if (format == meta.end() || format->second != kCacheFormat || bytes == meta.end() || key == meta.end()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a FlexFed token file; delete it to rebuild"));
  }
  absl::StatusOr<at::Tensor> tokens = c.file_->Get("tokens");
  absl::StatusOr<at::Tensor> offsets = c.file_->Get("doc_offsets");
  if (!tokens.ok() || !offsets.ok() || tokens->scalar_type() != at::kInt || offsets->scalar_type() != at::kLong ||
      tokens->dim() != 1 || offsets->dim() != 1 || offsets->size(0) < 1) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": token file lacks I32 'tokens' or I64 'doc_offsets'; delete it to rebuild"));
  }
  c.tokens_ = *tokens;
  c.offsets_ = offsets->contiguous();
  const int64_t* off = c.offsets_.data_ptr<int64_t>();
  for (int64_t d = 0; d + 1 < c.offsets_.size(0); ++d) {
    if (off[d] > off[d + 1]) return absl::InvalidArgumentError(absl::StrCat(path, ": document offsets decrease; delete it to rebuild"));
  }
  if (off[0] != 0 || off[c.offsets_.size(0) - 1] != c.tokens_.size(0)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": document offsets do not cover the tokens; delete it to rebuild"));
  }
  c.num_bytes_ = std::stoll(bytes->second);
  c.key_ = key->second;
  return c;
}

absl::StatusOr<TokenCorpus> TokenCorpus::Build(const std::vector<std::string>& inputs, const Tokenizer& tokenizer,
                                               const CorpusOptions& options, const std::string& cache_dir,
                                               bool* cache_hit) {
  absl::StatusOr<std::vector<std::string>> files = ExpandInputs(inputs);
  if (!files.ok()) return files.status();
  Sha256 key_hash;
  key_hash.Update(absl::StrCat(kCacheFormat, "\n", tokenizer.id(), "\n", options.text_field, "\n"));
  for (const std::string& path : *files) {
    absl::StatusOr<std::string> digest = Sha256File(path);
    if (!digest.ok()) return digest.status();
    key_hash.Update(absl::StrCat(IsJsonl(path) ? "jsonl " : "text ", *digest, "\n"));
  }
  const std::string key = key_hash.HexDigest();
  const std::string path = (fs::path(cache_dir) / (key + ".tokens.safetensors")).string();
  std::error_code ec;
  if (fs::exists(path, ec)) {
    absl::StatusOr<TokenCorpus> cached = Open(path);
    if (cached.ok() && cached->key() == key) {
      if (cache_hit) *cache_hit = true;
      return cached;
    }
    // A damaged cache entry is rebuilt rather than trusted.
  }
  if (cache_hit) *cache_hit = false;

  // Documents are tokenized on every core, a batch at a time, and appended in their order.
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets = {0};
  int64_t text_bytes = 0;
  std::vector<std::string> batch;
  size_t batch_bytes = 0;
  const size_t workers = std::max(1u, std::thread::hardware_concurrency());
  auto flush = [&] {
    std::vector<std::vector<int32_t>> ids(batch.size());
    std::atomic<size_t> next{0};
    auto work = [&] {
      for (size_t i = next++; i < batch.size(); i = next++) ids[i] = tokenizer.Encode(batch[i]);
    };
    std::vector<std::thread> threads;
    for (size_t w = 1; w < std::min(workers, batch.size()); ++w) threads.emplace_back(work);
    work();
    for (std::thread& t : threads) t.join();
    for (const std::vector<int32_t>& doc : ids) {
      tokens.insert(tokens.end(), doc.begin(), doc.end());
      offsets.push_back(static_cast<int64_t>(tokens.size()));
    }
    batch.clear();
    batch_bytes = 0;
  };
  absl::Status s = ForEachDocument(*files, options, [&](const std::string&, std::string_view text) {
    batch.emplace_back(text);
    batch_bytes += text.size();
    text_bytes += static_cast<int64_t>(text.size());
    if (batch_bytes >= (16u << 20) || batch.size() >= 8192) flush();
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  flush();
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("the data (", inputs.front(), (inputs.size() > 1 ? ", ..." : ""),
                                                   ") holds no text; give non-empty documents"));
  }
  fs::create_directories(cache_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(cache_dir, ": cannot create cache folder: ", ec.message()));
  const int64_t n = static_cast<int64_t>(tokens.size()), d = static_cast<int64_t>(offsets.size());
  std::vector<NamedTensor> out = {
      {"tokens", at::from_blob(tokens.data(), {n}, at::kInt)},
      {"doc_offsets", at::from_blob(offsets.data(), {d}, at::kLong)},
  };
  s = WriteSafetensors(path, out,
                       {{"format", kCacheFormat}, {"key", key}, {"tokenizer", tokenizer.id()},
                        {"text_bytes", std::to_string(text_bytes)}});
  if (!s.ok()) return s;
  return Open(path);
}

std::vector<int64_t> Permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  uint64_t state = seed;
  for (int64_t i = n - 1; i > 0; --i) {
    // Lemire's multiply-shift keeps the draw unbiased enough for shuffling and is portable.
    const uint64_t r = SplitMix64(state);
    const int64_t j = static_cast<int64_t>((static_cast<unsigned __int128>(r) * static_cast<uint64_t>(i + 1)) >> 64);
    std::swap(p[i], p[j]);
  }
  return p;
}

DocumentSplit SplitDocuments(int64_t num_documents, double validation_fraction, uint64_t seed) {
  std::vector<int64_t> order = Permutation(num_documents, seed);
  int64_t held_out = static_cast<int64_t>(std::ceil(validation_fraction * static_cast<double>(num_documents)));
  if (validation_fraction > 0 && num_documents >= 2) held_out = std::max<int64_t>(held_out, 1);
  held_out = std::min(held_out, num_documents > 1 ? num_documents - 1 : 0);
  DocumentSplit split;
  split.validation.assign(order.begin(), order.begin() + held_out);
  split.train.assign(order.begin() + held_out, order.end());
  return split;
}

PackedSequences::PackedSequences(TokenCorpus corpus, std::vector<int64_t> documents, int64_t seq_len, int32_t eos_id)
    : corpus_(std::move(corpus)), documents_(std::move(documents)), seq_len_(seq_len), eos_id_(eos_id) {
  TORCH_CHECK(seq_len > 0, "PackedSequences: seq_len must be positive");
  stream_starts_.reserve(documents_.size() + 1);
  int64_t pos = 0;
  for (int64_t d : documents_) {
    TORCH_CHECK(d >= 0 && d < corpus_.num_documents(), "PackedSequences: document ", d, " out of range");
    stream_starts_.push_back(pos);
    pos += corpus_.document_length(d) + 1;  // + EOS
  }
  stream_starts_.push_back(pos);
  num_sequences_ = pos > seq_len_ ? (pos - 1) / seq_len_ : 0;
}

void PackedSequences::Copy(int64_t i, int32_t* out) const {
  TORCH_CHECK(i >= 0 && i < num_sequences_, "PackedSequences: sequence ", i, " out of range");
  int64_t pos = i * seq_len_;
  const int64_t end = pos + seq_len_ + 1;
  // The document holding stream position `pos`.
  size_t doc = std::upper_bound(stream_starts_.begin(), stream_starts_.end(), pos) - stream_starts_.begin() - 1;
  const int32_t* tokens = corpus_.tokens();
  const int64_t* offsets = corpus_.doc_offsets();
  while (pos < end) {
    const int64_t d = documents_[doc];
    const int64_t in_doc = pos - stream_starts_[doc];
    const int64_t len = offsets[d + 1] - offsets[d];
    if (in_doc < len) {
      const int64_t take = std::min(len - in_doc, end - pos);
      std::copy_n(tokens + offsets[d] + in_doc, take, out);
      out += take;
      pos += take;
    } else {
      *out++ = eos_id_;
      ++pos;
      ++doc;
    }
  }
}

at::Tensor PackedSequences::Batch(const std::vector<int64_t>& indices) const {
  const int64_t b = static_cast<int64_t>(indices.size());
  at::Tensor out = at::empty({b, seq_len_ + 1}, at::kInt);
  for (int64_t r = 0; r < b; ++r) Copy(indices[r], out.data_ptr<int32_t>() + r * (seq_len_ + 1));
  return out.to(at::kLong);
}

}  // namespace flexfed
