// libFuzzer target for tokenizer.json (LoadHfTokenizer, common/model/hf_tokenizer.cpp): a user's
// checkpoint brings it, an owner's training reads it, the server will. The input is the file; an
// accepted tokenizer must encode a few fixed texts into ids below its vocabulary size and decode
// them without failing.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "common/model/hf_tokenizer.h"

namespace {

const std::string& Dir() {
  static const std::string dir = [] {
    std::string tmpl = (std::filesystem::temp_directory_path() / "flexfed-tokenizer-fuzz-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
    return tmpl;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  {
    std::ofstream out(Dir() + "/tokenizer.json", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  absl::StatusOr<std::unique_ptr<flexfed::Tokenizer>> tok = flexfed::LoadHfTokenizer(Dir());
  if (!tok.ok()) return 0;
  for (const char* text : {"Hello, world!", "def f(x):\n    return x ** 2  # 東京", "  \t\n", "ünïcödé 🙂 ١٢٣"}) {
    const std::vector<int32_t> ids = (*tok)->Encode(text);
    for (int32_t id : ids) {
      if (id < 0 || id >= (*tok)->vocab_size()) std::abort();
    }
    (void)(*tok)->Decode(ids);
  }
  return 0;
}
