#include "common/train/documents.h"

#include <algorithm>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/model/tokenizer.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

namespace fs = std::filesystem;

absl::Status CheckUtf8(const std::string& source, std::string_view text) {
  size_t bad = FindInvalidUtf8(text);
  if (bad == std::string_view::npos) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(source, ": invalid UTF-8 at byte ", bad,
                                                 "; convert the file to UTF-8 (e.g. with iconv) or remove it"));
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ExpandInputs(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  if (inputs.empty()) return absl::InvalidArgumentError("no data given; pass text files, .jsonl files or folders");
  for (const std::string& input : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(input, ec);
    if (ec || !fs::exists(st)) {
      return absl::NotFoundError(absl::StrCat(input, ": no such file or folder"));
    }
    if (fs::is_directory(st)) {
      std::vector<std::string> found;
      for (auto it = fs::recursive_directory_iterator(input, ec); !ec && it != fs::recursive_directory_iterator();
           it.increment(ec)) {
        const std::string name = it->path().filename().string();
        if (!name.empty() && name[0] == '.') {
          if (it->is_directory()) it.disable_recursion_pending();
          continue;
        }
        if (it->is_regular_file()) found.push_back(it->path().string());
      }
      if (ec) return absl::InternalError(absl::StrCat(input, ": cannot list folder: ", ec.message()));
      std::sort(found.begin(), found.end());
      if (found.empty()) return absl::InvalidArgumentError(absl::StrCat(input, ": folder holds no files"));
      files.insert(files.end(), found.begin(), found.end());
    } else {
      files.push_back(input);
    }
  }
  return files;
}

bool IsJsonl(const std::string& path) {
  const std::string ext = fs::path(path).extension().string();
  return ext == ".jsonl" || ext == ".ndjson";
}

absl::Status VisitDocuments(const std::string& path, const std::string& contents, const CorpusOptions& options,
                            const std::function<absl::Status(const std::string&, std::string_view)>& visit) {
  if (!IsJsonl(path)) {
    if (absl::Status s = CheckUtf8(path, contents); !s.ok()) return s;
    return visit(path, contents);
  }
  size_t line_no = 0, pos = 0;
  while (pos < contents.size()) {
    size_t end = contents.find('\n', pos);
    if (end == std::string::npos) end = contents.size();
    std::string_view line(contents.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string source = absl::StrCat(path, ":", line_no);
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON (or not valid UTF-8); fix or remove the line"));
    }
    if (!j.is_object() || !j.contains(options.text_field) || !j[options.text_field].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": no string field '", options.text_field,
                                                     "'; choose the field with --text-field"));
    }
    const std::string& text = j[options.text_field].get_ref<const std::string&>();
    if (absl::Status s = CheckUtf8(source, text); !s.ok()) return s;
    if (absl::Status s = visit(source, text); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ForEachDocument(const std::vector<std::string>& inputs, const CorpusOptions& options,
                             const std::function<absl::Status(const std::string&, std::string_view)>& visit) {
  absl::StatusOr<std::vector<std::string>> files = ExpandInputs(inputs);
  if (!files.ok()) return files.status();
  for (const std::string& path : *files) {
    absl::StatusOr<std::string> contents = ReadFile(path);
    if (!contents.ok()) return contents.status();
    if (absl::Status s = VisitDocuments(path, *contents, options, visit); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace flexfed
