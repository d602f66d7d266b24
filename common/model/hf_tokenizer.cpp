// Format and semantics: docs/TOKENIZERS.md. The algorithms follow the `tokenizers` library's
// (normalize → split on added tokens → pre-tokenize → BPE per piece → ids), and each step says
// where it must agree with it.
#include "common/model/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <optional>
#include <queue>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/core/sha256.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------------- UTF-8 helpers

// The code point at `s[i]` (valid UTF-8 assumed) and its length in bytes.
std::pair<int32_t, size_t> DecodeUtf8(std::string_view s, size_t i) {
  utf8proc_int32_t cp = 0;
  const utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                              static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
  return {cp, n > 0 ? static_cast<size_t>(n) : 1};
}

void AppendUtf8(std::string& out, int32_t cp) {
  utf8proc_uint8_t buf[4];
  const utf8proc_ssize_t n = utf8proc_encode_char(cp, buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

// Rust's char::is_whitespace: the Unicode White_Space property.
bool IsWhitespace(int32_t cp) {
  switch (cp) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x20: case 0x85: case 0xA0: case 0x1680:
    case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

// Rust's char::is_alphanumeric: Alphabetic or Numeric (approximated by the L* and N* categories).
bool IsAlphanumeric(int32_t cp) {
  switch (utf8proc_category(cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

// Text with every invalid UTF-8 sequence replaced by U+FFFD (what a Python str of the same bytes
// decoded with errors="replace" holds): the tokenizers library only ever sees valid text.
std::string ValidUtf8(std::string_view text) {
  std::string out;
  size_t i = 0;
  while (true) {
    const size_t bad = FindInvalidUtf8(text.substr(i));
    if (bad == std::string_view::npos) break;
    out.append(text.substr(i, bad));
    out.append("\xEF\xBF\xBD");
    i += bad + 1;
  }
  out.append(text.substr(i));
  return out;
}

// ------------------------------------------------------------------------------ byte-level alphabet

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for 256 + n.
std::vector<int32_t> ByteToCodePoint() {
  std::vector<int32_t> map(256, -1);
  for (int b = 0; b < 256; ++b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) map[b] = b;
  }
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    if (map[b] < 0) map[b] = 256 + n++;
  }
  return map;
}

const std::vector<int32_t>& ByteMap() {
  static const std::vector<int32_t> map = ByteToCodePoint();
  return map;
}

// A byte-level token string → the bytes it stands for; nullopt when a character is not in the
// byte alphabet (the ByteLevel decoder then keeps the token's own UTF-8).
std::optional<std::string> ByteLevelBytes(std::string_view token) {
  static const absl::flat_hash_map<int32_t, char> reverse = [] {
    absl::flat_hash_map<int32_t, char> r;
    for (int b = 0; b < 256; ++b) r[ByteMap()[b]] = static_cast<char>(b);
    return r;
  }();
  std::string out;
  for (size_t i = 0; i < token.size();) {
    auto [cp, len] = DecodeUtf8(token, i);
    auto it = reverse.find(cp);
    if (it == reverse.end()) return std::nullopt;
    out.push_back(it->second);
    i += len;
  }
  return out;
}

// ----------------------------------------------------------------------------------- the regex

// A PCRE2 pattern compiled with UTF and Unicode properties, JIT-compiled where available.
class Regex {
 public:
  static absl::StatusOr<std::shared_ptr<Regex>> Compile(const std::string& pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InvalidArgumentError(absl::StrCat("pre-tokenizer regex /", pattern, "/ does not compile at offset ",
                                                     offset, ": ", reinterpret_cast<const char*>(message)));
    }
    auto regex = std::shared_ptr<Regex>(new Regex(code));
    regex->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    return regex;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Every non-overlapping match in `text` (valid UTF-8), left to right, as [begin, end) byte ranges;
  // an empty match advances by one character, as the tokenizers library's regex iterator does.
  void FindAll(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
    out.clear();
    thread_local std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
        pcre2_match_data_create(8, nullptr), &pcre2_match_data_free);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t start = 0;
    while (start <= text.size()) {
      const int rc = jit_ ? pcre2_jit_match(code_, subject, text.size(), start, 0, data.get(), nullptr)
                          : pcre2_match(code_, subject, text.size(), start, PCRE2_NO_UTF_CHECK, data.get(), nullptr);
      if (rc < 0) break;  // PCRE2_ERROR_NOMATCH, or a matching limit: no further matches
      const PCRE2_SIZE* v = pcre2_get_ovector_pointer(data.get());
      const size_t b = v[0], e = v[1];
      out.emplace_back(b, e);
      if (e > b) {
        start = e;
      } else {
        if (b >= text.size()) break;
        start = b + DecodeUtf8(text, b).second;
      }
    }
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
  bool jit_ = false;
};

constexpr char kGpt2Pattern[] = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ------------------------------------------------------------------------------ pre-tokenizers

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// One step of the pre-tokenizer: Split (pattern + behaviour) or ByteLevel (prefix space, regex).
struct PreTokenizerStep {
  enum Kind { kSplit, kByteLevel } kind = kSplit;
  std::shared_ptr<Regex> regex;  // Split with a Regex pattern; ByteLevel with use_regex
  std::string literal;           // Split with a String pattern
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
};

using Range = std::pair<size_t, size_t>;

// The pieces of `text` [begin, end) after splitting on `step`'s pattern, as the tokenizers library's
// NormalizedString::split computes them (empty pieces dropped).
void SplitPiece(const PreTokenizerStep& step, std::string_view text, std::vector<Range>& out) {
  std::vector<std::pair<Range, bool>> matches;  // (range, is_delimiter)
  std::vector<Range> found;
  if (step.regex) {
    step.regex->FindAll(text, found);
  } else if (!step.literal.empty()) {
    for (size_t p = text.find(step.literal); p != std::string_view::npos; p = text.find(step.literal, p + step.literal.size())) {
      found.emplace_back(p, p + step.literal.size());
    }
  }
  if (text.empty()) {
    matches.push_back({{0, 0}, false});
  } else {
    size_t prev = 0;
    for (const Range& m : found) {
      if (prev != m.first) matches.push_back({{prev, m.first}, false});
      matches.push_back({m, true});
      prev = m.second;
    }
    if (prev != text.size()) matches.push_back({{prev, text.size()}, false});
  }
  if (step.invert) {
    for (auto& m : matches) m.second = !m.second;
  }
  std::vector<std::pair<Range, bool>> splits;  // (range, remove)
  bool previous = false;
  switch (step.behavior) {
    case Behavior::kRemoved:
      splits = matches;
      break;
    case Behavior::kIsolated:
      for (const auto& m : matches) splits.push_back({m.first, false});
      break;
    case Behavior::kMergedWithPrevious:
      for (const auto& [r, is_match] : matches) {
        if (is_match && !previous && !splits.empty()) {
          splits.back().first.second = r.second;
        } else {
          splits.push_back({r, false});
        }
        previous = is_match;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = matches.rbegin(); it != matches.rend(); ++it) {
        const auto& [r, is_match] = *it;
        if (is_match && !previous && !splits.empty()) {
          splits.back().first.first = r.first;
        } else {
          splits.push_back({r, false});
        }
        previous = is_match;
      }
      std::reverse(splits.begin(), splits.end());
      break;
    case Behavior::kContiguous:
      for (const auto& [r, is_match] : matches) {
        if (is_match == previous && !splits.empty()) {
          splits.back().first.second = r.second;
        } else {
          splits.push_back({r, false});
        }
        previous = is_match;
      }
      break;
  }
  out.clear();
  for (const auto& [r, remove] : splits) {
    if (!remove && r.second > r.first) out.push_back(r);
  }
}

absl::StatusOr<Behavior> ParseBehavior(const json& j) {
  static const std::pair<const char*, Behavior> kNames[] = {
      {"Removed", Behavior::kRemoved}, {"Isolated", Behavior::kIsolated},
      {"MergedWithPrevious", Behavior::kMergedWithPrevious}, {"MergedWithNext", Behavior::kMergedWithNext},
      {"Contiguous", Behavior::kContiguous}};
  const std::string name = j.is_string() ? j.get<std::string>() : "";
  for (const auto& [n, b] : kNames) {
    if (name == n) return b;
  }
  return absl::InvalidArgumentError(absl::StrCat("Split behavior '", j.dump(), "' is not one of Removed, Isolated, "
                                                 "MergedWithPrevious, MergedWithNext, Contiguous"));
}

absl::Status ParsePreTokenizer(const json& j, std::vector<PreTokenizerStep>& steps) {
  if (j.is_null()) return absl::OkStatus();
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return absl::InvalidArgumentError("pre_tokenizer: expected an object with a \"type\"");
  }
  const std::string type = j["type"];
  if (type == "Sequence") {
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array()) {
      return absl::InvalidArgumentError("pre_tokenizer Sequence: no \"pretokenizers\" list");
    }
    for (const json& p : j["pretokenizers"]) {
      if (absl::Status s = ParsePreTokenizer(p, steps); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  PreTokenizerStep step;
  if (type == "Split") {
    step.kind = PreTokenizerStep::kSplit;
    const json pattern = j.value("pattern", json());
    if (pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string()) {
      absl::StatusOr<std::shared_ptr<Regex>> r = Regex::Compile(pattern["Regex"].get<std::string>());
      if (!r.ok()) return r.status();
      step.regex = *r;
    } else if (pattern.is_object() && pattern.contains("String") && pattern["String"].is_string()) {
      step.literal = pattern["String"].get<std::string>();
    } else {
      return absl::InvalidArgumentError("pre_tokenizer Split: pattern must be {\"Regex\": ...} or {\"String\": ...}");
    }
    absl::StatusOr<Behavior> b = ParseBehavior(j.value("behavior", json()));
    if (!b.ok()) return b.status();
    step.behavior = *b;
    step.invert = j.value("invert", false);
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::kByteLevel;
    step.add_prefix_space = j.value("add_prefix_space", false);
    if (j.value("use_regex", true)) {
      absl::StatusOr<std::shared_ptr<Regex>> r = Regex::Compile(kGpt2Pattern);
      if (!r.ok()) return r.status();
      step.regex = *r;
    }
  } else {
    return absl::UnimplementedError(absl::StrCat("pre_tokenizer type '", type, "' is not supported (FlexFed reads Split, "
                                                 "ByteLevel and Sequence; docs/TOKENIZERS.md)"));
  }
  steps.push_back(std::move(step));
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------ the model

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

class HfTokenizer final : public Tokenizer {
 public:
  std::string id() const override { return id_; }
  int64_t vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  int32_t pad_id() const override { return pad_; }
  std::vector<int32_t> Encode(std::string_view text) const override;
  std::string Decode(const std::vector<int32_t>& ids) const override;
  int64_t TokenBytes(int32_t id) const override {
    return id >= 0 && static_cast<size_t>(id) < token_bytes_.size() ? static_cast<int64_t>(token_bytes_[id].size()) : 0;
  }

  static absl::StatusOr<std::unique_ptr<HfTokenizer>> Load(const std::string& dir);

 private:
  // Splits `text` on the added tokens in `tokens` (indices into added_): text pieces get -1.
  void SplitOnAdded(std::string_view text, const std::vector<size_t>& tokens,
                    std::vector<std::pair<Range, int32_t>>& out) const;
  std::string Normalize(std::string_view text) const;
  void EncodeText(std::string_view text, std::vector<int32_t>& ids) const;  // normalized text, no added tokens
  void EncodeWord(std::string_view bytes, std::vector<int32_t>& ids) const;  // one pre-token's bytes
  void Bpe(std::string_view bytes, std::vector<int32_t>& ids) const;

  std::string id_;
  int64_t vocab_size_ = 0;
  int32_t bos_ = -1, eos_ = -1, pad_ = -1;
  bool nfc_ = false;
  std::vector<PreTokenizerStep> steps_;
  bool ignore_merges_ = false;
  int32_t byte_id_[256];  // the vocabulary id of each single byte, -1 when absent
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a, b) → (rank, merged id)
  absl::flat_hash_map<std::string, int32_t> raw_vocab_;  // the bytes a token stands for → id (ignore_merges)
  std::vector<AddedToken> added_;
  std::vector<size_t> raw_added_, normalized_added_;  // which added tokens match raw / normalized text
  std::vector<std::string> token_bytes_;  // id → the bytes it decodes to ("" for special tokens)
  std::vector<bool> special_;
  uint64_t instance_ = 0;  // keys the per-thread word cache
};

uint64_t Pair(int32_t a, int32_t b) { return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b); }

std::string HfTokenizer::Normalize(std::string_view text) const {
  if (!nfc_ || text.empty()) return std::string(text);
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                          static_cast<utf8proc_ssize_t>(text.size()), &out,
                                          static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) return std::string(text);  // cannot happen on valid UTF-8
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

void HfTokenizer::SplitOnAdded(std::string_view text, const std::vector<size_t>& tokens,
                               std::vector<std::pair<Range, int32_t>>& out) const {
  out.clear();
  size_t start_offset = 0, pos = 0;
  while (!tokens.empty() && pos < text.size()) {
    // Leftmost-longest match of any added token at or after `pos`.
    size_t best = std::string_view::npos, best_len = 0;
    const AddedToken* token = nullptr;
    for (size_t k : tokens) {
      const AddedToken& t = added_[k];
      const size_t p = text.find(t.content, pos);
      if (p == std::string_view::npos) continue;
      if (p < best || (p == best && t.content.size() > best_len)) best = p, best_len = t.content.size(), token = &t;
    }
    if (token == nullptr) break;
    size_t start = best, stop = best + best_len;
    pos = best + std::max<size_t>(best_len, 1);
    if (token->single_word) {
      bool start_ok = true, stop_ok = true;
      if (start > 0) {
        size_t k = start - 1;
        while (k > 0 && (static_cast<uint8_t>(text[k]) & 0xC0) == 0x80) --k;
        start_ok = !IsAlphanumeric(DecodeUtf8(text, k).first);
      }
      if (stop < text.size()) stop_ok = !IsAlphanumeric(DecodeUtf8(text, stop).first);
      if (!start_ok || !stop_ok) continue;
    }
    if (token->lstrip) {
      size_t s = start;
      while (s > 0) {
        size_t k = s - 1;
        while (k > 0 && (static_cast<uint8_t>(text[k]) & 0xC0) == 0x80) --k;
        if (!IsWhitespace(DecodeUtf8(text, k).first)) break;
        s = k;
      }
      start = std::max(s, start_offset);
    }
    if (token->rstrip) {
      while (stop < text.size()) {
        auto [cp, len] = DecodeUtf8(text, stop);
        if (!IsWhitespace(cp)) break;
        stop += len;
      }
      pos = std::max(pos, stop);
    }
    if (start_offset < start) out.push_back({{start_offset, start}, -1});
    out.push_back({{start, stop}, token->id});
    start_offset = stop;
  }
  if (start_offset < text.size()) out.push_back({{start_offset, text.size()}, -1});
}

std::vector<int32_t> HfTokenizer::Encode(std::string_view input) const {
  std::vector<int32_t> ids;
  std::string sanitized;
  if (FindInvalidUtf8(input) != std::string_view::npos) {
    sanitized = ValidUtf8(input);
    input = sanitized;
  }
  // 1. Added tokens that match the raw text; 2. normalize the rest; 3. added tokens that match the
  // normalized text; 4. pre-tokenize and BPE what is left.
  std::vector<std::pair<Range, int32_t>> raw_parts, parts;
  SplitOnAdded(input, raw_added_, raw_parts);
  for (const auto& [r, id] : raw_parts) {
    if (id >= 0) {
      ids.push_back(id);
      continue;
    }
    const std::string normalized = Normalize(input.substr(r.first, r.second - r.first));
    SplitOnAdded(normalized, normalized_added_, parts);
    for (const auto& [nr, nid] : parts) {
      if (nid >= 0) {
        ids.push_back(nid);
      } else {
        EncodeText(std::string_view(normalized).substr(nr.first, nr.second - nr.first), ids);
      }
    }
  }
  return ids;
}

void HfTokenizer::EncodeText(std::string_view text, std::vector<int32_t>& ids) const {
  // Pieces as owned strings: ByteLevel's prefix space may add a byte.
  std::vector<std::string> pieces = {std::string(text)}, next;
  std::vector<Range> ranges;
  for (const PreTokenizerStep& step : steps_) {
    next.clear();
    for (std::string& piece : pieces) {
      if (step.kind == PreTokenizerStep::kByteLevel) {
        if (step.add_prefix_space && (piece.empty() || piece[0] != ' ')) piece.insert(piece.begin(), ' ');
        if (!step.regex) {
          next.push_back(std::move(piece));
          continue;
        }
        PreTokenizerStep isolated;
        isolated.regex = step.regex;
        SplitPiece(isolated, piece, ranges);
      } else {
        SplitPiece(step, piece, ranges);
      }
      for (const Range& r : ranges) next.emplace_back(piece.substr(r.first, r.second - r.first));
    }
    pieces.swap(next);
  }
  for (const std::string& piece : pieces) EncodeWord(piece, ids);
}

void HfTokenizer::EncodeWord(std::string_view bytes, std::vector<int32_t>& ids) const {
  if (bytes.empty()) return;
  if (ignore_merges_) {
    auto it = raw_vocab_.find(absl::string_view(bytes.data(), bytes.size()));
    if (it != raw_vocab_.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  // Words repeat (spaces, common words): a per-thread cache, as the tokenizers library keeps one.
  struct Cache {
    uint64_t instance = 0;
    absl::flat_hash_map<std::string, std::vector<int32_t>> words;
  };
  thread_local Cache cache;
  if (cache.instance != instance_) {
    cache.words.clear();
    cache.instance = instance_;
  }
  constexpr size_t kMaxCachedWordBytes = 64, kMaxCachedWords = 1 << 16;
  if (bytes.size() <= kMaxCachedWordBytes) {
    auto it = cache.words.find(absl::string_view(bytes.data(), bytes.size()));
    if (it != cache.words.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t before = ids.size();
  Bpe(bytes, ids);
  if (bytes.size() <= kMaxCachedWordBytes) {
    if (cache.words.size() >= kMaxCachedWords) cache.words.clear();
    cache.words.emplace(std::string(bytes), std::vector<int32_t>(ids.begin() + static_cast<ptrdiff_t>(before), ids.end()));
  }
}

// BPE over one word's bytes: the lowest-ranked adjacent pair merges first, the leftmost of equal
// ranks first (the tokenizers library's priority queue on (rank, position)).
void HfTokenizer::Bpe(std::string_view bytes, std::vector<int32_t>& ids) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(bytes.size());
  for (unsigned char b : bytes) {
    const int32_t id = byte_id_[b];
    if (id < 0) continue;  // not in the vocabulary and no unknown token: dropped, as the library does
    const int32_t i = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, i - 1, i + 1, true});
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;
  struct Candidate {
    int32_t rank, pos;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto consider = [&](int32_t pos) {
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    auto it = merges_.find(Pair(symbols[pos].id, symbols[next].id));
    if (it != merges_.end()) queue.push({it->second.first, pos});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) consider(i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& left = symbols[c.pos];
    if (!left.alive || left.next < 0) continue;
    auto it = merges_.find(Pair(left.id, symbols[left.next].id));
    if (it == merges_.end() || it->second.first != c.rank) continue;  // stale: a neighbour changed
    Symbol& right = symbols[left.next];
    left.id = it->second.second;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = c.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(c.pos);
  }
  for (const Symbol& s : symbols) {
    if (s.alive) ids.push_back(s.id);
  }
}

std::string HfTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id >= 0 && static_cast<size_t>(id) < token_bytes_.size()) out += token_bytes_[id];
  }
  return out;
}

// The id of a special-token entry of tokenizer_config.json ("<|x|>" or {"content": "<|x|>"}).
std::optional<int32_t> ConfigToken(const json& config, const char* key, const absl::flat_hash_map<std::string, int32_t>& ids) {
  if (!config.is_object() || !config.contains(key)) return std::nullopt;
  const json& v = config[key];
  std::string content;
  if (v.is_string()) {
    content = v.get<std::string>();
  } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    content = v["content"].get<std::string>();
  } else {
    return std::nullopt;
  }
  auto it = ids.find(content);
  if (it == ids.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::Load(const std::string& dir) {
  const std::string path = (fs::path(dir) / kHfTokenizerFile).string();
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  auto bad = [&](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat(path, ": ", what)); };
  const json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");

  auto t = std::unique_ptr<HfTokenizer>(new HfTokenizer());
  static std::atomic<uint64_t> instances{0};
  t->instance_ = ++instances;
  t->id_ = "hf:" + Sha256Hex(*text);

  // Normalizer: null, NFC, or a Sequence of those.
  std::vector<json> normalizers;
  if (j.contains("normalizer") && !j["normalizer"].is_null()) normalizers.push_back(j["normalizer"]);
  for (size_t i = 0; i < normalizers.size(); ++i) {
    const json n = normalizers[i];
    const std::string type = n.is_object() ? n.value("type", "") : "";
    if (type == "Sequence" && n.contains("normalizers") && n["normalizers"].is_array()) {
      for (const json& m : n["normalizers"]) normalizers.push_back(m);
    } else if (type == "NFC") {
      t->nfc_ = true;
    } else {
      return absl::UnimplementedError(absl::StrCat(path, ": normalizer '", n.dump().substr(0, 80),
                                                   "' is not supported (FlexFed reads none, NFC and Sequence of those)"));
    }
  }
  if (absl::Status s = ParsePreTokenizer(j.value("pre_tokenizer", json()), t->steps_); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }

  // Model: byte-level BPE.
  const json model = j.value("model", json());
  if (!model.is_object() || model.value("type", "") != "BPE") {
    return absl::UnimplementedError(absl::StrCat(path, ": model type '", model.is_object() ? model.value("type", "") : "",
                                                 "' is not supported (FlexFed reads BPE)"));
  }
  if (model.value("byte_fallback", false)) return absl::UnimplementedError(path + ": BPE byte_fallback is not supported");
  if (!model.value("continuing_subword_prefix", json("")).is_null() && !model.value("continuing_subword_prefix", std::string()).empty()) {
    return absl::UnimplementedError(path + ": BPE continuing_subword_prefix is not supported");
  }
  if (!model.value("end_of_word_suffix", json("")).is_null() && !model.value("end_of_word_suffix", std::string()).empty()) {
    return absl::UnimplementedError(path + ": BPE end_of_word_suffix is not supported");
  }
  if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0) {
    return absl::UnimplementedError(path + ": BPE dropout is not supported (it makes encoding random)");
  }
  t->ignore_merges_ = model.value("ignore_merges", false);
  const json vocab = model.value("vocab", json());
  if (!vocab.is_object() || vocab.empty()) return bad("model.vocab: expected a non-empty object of token → id");
  absl::flat_hash_map<std::string, int32_t> token_ids;
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() >= (1 << 24)) {
      return bad(absl::StrCat("model.vocab['", it.key(), "']: expected an id in 0..2^24"));
    }
    token_ids[it.key()] = it.value().get<int32_t>();
    max_id = std::max<int64_t>(max_id, it.value().get<int64_t>());
  }
  const json added = j.value("added_tokens", json::array());
  if (!added.is_array()) return bad("added_tokens: expected a list");
  for (const json& a : added) {
    if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
        !a["content"].is_string() || a["content"].get<std::string>().empty()) {
      return bad("added_tokens: every entry needs an integer id and a non-empty content");
    }
    AddedToken at{a["id"].get<int32_t>(), a["content"].get<std::string>(), a.value("special", false), a.value("lstrip", false),
                  a.value("rstrip", false), a.value("single_word", false), a.value("normalized", !a.value("special", false))};
    if (at.id < 0 || at.id >= (1 << 24)) return bad(absl::StrCat("added token '", at.content, "': id out of range"));
    max_id = std::max<int64_t>(max_id, at.id);
    token_ids[at.content] = at.id;
    (at.normalized ? t->normalized_added_ : t->raw_added_).push_back(t->added_.size());
    t->added_.push_back(std::move(at));
  }
  t->vocab_size_ = max_id + 1;

  // What each id decodes to; the byte alphabet; the raw vocabulary.
  t->token_bytes_.assign(static_cast<size_t>(t->vocab_size_), std::string());
  t->special_.assign(static_cast<size_t>(t->vocab_size_), false);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = it.value().get<int32_t>();
    std::optional<std::string> bytes = ByteLevelBytes(it.key());
    t->token_bytes_[id] = bytes ? *bytes : it.key();
    if (bytes) t->raw_vocab_[*bytes] = id;
  }
  for (const AddedToken& at : t->added_) {
    t->special_[at.id] = at.special;
    std::optional<std::string> bytes = ByteLevelBytes(at.content);
    t->token_bytes_[at.id] = at.special ? std::string() : (bytes ? *bytes : at.content);
  }
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    AppendUtf8(ch, ByteMap()[b]);
    auto it = token_ids.find(ch);
    t->byte_id_[b] = it == token_ids.end() ? -1 : it->second;
  }

  // Merges: "a b" strings (older files) or ["a", "b"] pairs.
  const json merges = model.value("merges", json::array());
  if (!merges.is_array()) return bad("model.merges: expected a list");
  int32_t rank = 0;
  for (const json& m : merges) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ', 1);
      if (space == std::string::npos) return bad(absl::StrCat("merge '", s, "': expected two tokens separated by a space"));
      a = s.substr(0, space), b = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>(), b = m[1].get<std::string>();
    } else {
      return bad(absl::StrCat("merge ", m.dump().substr(0, 60), ": expected \"a b\" or [\"a\", \"b\"]"));
    }
    auto ia = token_ids.find(a), ib = token_ids.find(b), im = token_ids.find(a + b);
    if (ia == token_ids.end() || ib == token_ids.end() || im == token_ids.end()) {
      return bad(absl::StrCat("merge '", a, " ", b, "' uses a token the vocabulary does not have"));
    }
    t->merges_.emplace(Pair(ia->second, ib->second), std::make_pair(rank++, im->second));
  }

  // Decoder: ByteLevel (or none, which FlexFed decodes the same way for byte-level vocabularies).
  const json decoder = j.value("decoder", json());
  if (!decoder.is_null()) {
    const std::string type = decoder.is_object() ? decoder.value("type", "") : "";
    if (type != "ByteLevel") {
      return absl::UnimplementedError(absl::StrCat(path, ": decoder '", type, "' is not supported (FlexFed reads ByteLevel)"));
    }
  }

  // BOS/EOS/PAD from tokenizer_config.json.
  json config;
  const std::string config_path = (fs::path(dir) / kHfTokenizerConfigFile).string();
  if (fs::exists(config_path)) {
    absl::StatusOr<std::string> c = ReadFile(config_path);
    if (!c.ok()) return c.status();
    config = json::parse(*c, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded()) return absl::InvalidArgumentError(config_path + ": not valid JSON");
  }
  std::optional<int32_t> eos = ConfigToken(config, "eos_token", token_ids);
  if (!eos) {
    for (const AddedToken& at : t->added_) {
      if (at.special && (at.content == "<|endoftext|>" || at.content == "</s>")) eos = at.id;
    }
  }
  if (!eos) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": no end-of-text token: set \"eos_token\" in ", kHfTokenizerConfigFile,
                                                   " to one of the tokenizer's special tokens"));
  }
  t->eos_ = *eos;
  t->bos_ = ConfigToken(config, "bos_token", token_ids).value_or(t->eos_);
  t->pad_ = ConfigToken(config, "pad_token", token_ids).value_or(t->eos_);
  return t;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<HfTokenizer>> t = HfTokenizer::Load(dir);
  if (!t.ok()) return t.status();
  return std::unique_ptr<Tokenizer>(std::move(*t));
}

}  // namespace flexfed
