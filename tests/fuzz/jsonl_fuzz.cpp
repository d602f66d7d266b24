// libFuzzer target for JSONL training data (VisitDocuments, common/train/documents.cpp): the files
// an owner trains on come from anywhere. The input is one .jsonl file. Besides crashes and sanitizer
// reports it checks that every document handed on is valid UTF-8, and that an accepted file's
// documents, written back as JSON lines, read back the same.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/model/tokenizer.h"
#include "common/train/documents.h"
#include <nlohmann/json.hpp>

namespace {

absl::StatusOr<std::vector<std::string>> Read(const std::string& contents) {
  std::vector<std::string> texts;
  absl::Status s = flexfed::VisitDocuments("fuzz.jsonl", contents, {}, [&](const std::string& source, std::string_view text) {
    if (source.rfind("fuzz.jsonl:", 0) != 0 || flexfed::FindInvalidUtf8(text) != std::string_view::npos) std::abort();
    texts.emplace_back(text);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return texts;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<std::vector<std::string>> texts = Read(std::string(reinterpret_cast<const char*>(data), size));
  if (!texts.ok()) return 0;
  std::string again;
  for (const std::string& t : *texts) again += nlohmann::json({{"text", t}}).dump() + "\n";
  absl::StatusOr<std::vector<std::string>> back = Read(again);
  if (!back.ok() || *back != *texts) std::abort();
  return 0;
}
