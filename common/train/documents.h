// Documents from the files an owner trains on: text files, JSONL files and folders of them
// (docs/DATA.md). Torch-free: these files are the owner's own but arrive from anywhere, so the
// reader is fuzzed (tests/fuzz/jsonl_fuzz.cpp).
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

struct CorpusOptions {
  std::string text_field = "text";  // the field holding a document in each JSONL line
};

// The files of `inputs`: files as given, folders expanded (recursively, in path order, hidden
// files and folders skipped). Missing inputs and empty folders are errors naming them.
absl::StatusOr<std::vector<std::string>> ExpandInputs(const std::vector<std::string>& inputs);

// Whether `path` is read as JSON lines (.jsonl, .ndjson) rather than as one text document.
bool IsJsonl(const std::string& path);

// Visits the documents of one file whose bytes are `contents`: the whole file for a text file, or
// for JSONL each non-empty line's `text_field` (source "path:line"). Invalid JSON, a missing or
// non-string field and invalid UTF-8 are errors naming the place and the fix.
absl::Status VisitDocuments(const std::string& path, const std::string& contents, const CorpusOptions& options,
                            const std::function<absl::Status(const std::string& source, std::string_view text)>& visit);

// Visits every document of `inputs`, in a fixed order. An input is a text file (one document),
// a `.jsonl` file (one document per non-empty line, taken from `text_field`) or a folder (its
// files, recursively, in path order; hidden files skipped). `source` is "file" or "file:line".
// Unreadable files, invalid JSON, a missing field and invalid UTF-8 are errors naming the place.
absl::Status ForEachDocument(const std::vector<std::string>& inputs, const CorpusOptions& options,
                             const std::function<absl::Status(const std::string& source, std::string_view text)>& visit);

}  // namespace flexfed
