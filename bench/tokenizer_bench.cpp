// Tokenizer benchmark, FlexFed's side (bench/run_tokenizer_bench.sh): encodes the documents of
// DIR/corpus.jsonl with DIR/tokenizer.json (common/model/hf_tokenizer.h) one after the other on one
// thread — the same work as the tokenizers library's single-thread measurement — and then on every
// core, as corpus tokenization does. One JSON line per measurement, with the SHA-256 of the ids,
// which must equal the tokenizers library's.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "common/core/sha256.h"
#include "common/model/hf_tokenizer.h"
#include <nlohmann/json.hpp>

namespace {

using Clock = std::chrono::steady_clock;

// SHA-256 of every id as 4 little-endian bytes, documents in order.
std::string IdsDigest(const std::vector<std::vector<int32_t>>& encoded) {
  flexfed::Sha256 h;
  for (const auto& ids : encoded) h.Update(std::string_view(reinterpret_cast<const char*>(ids.data()), ids.size() * sizeof(int32_t)));
  return h.HexDigest();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"FlexFed tokenizer benchmark: encode throughput on one thread and on every core"};
  std::string dir;
  app.add_option("dir", dir, "Folder made by `bench/tokenizer_bench.py prepare`")->required()->check(CLI::ExistingDirectory);
  CLI11_PARSE(app, argc, argv);
  auto tok = flexfed::LoadHfTokenizer(dir);
  if (!tok.ok()) {
    std::cerr << "tokenizer_bench: " << tok.status().message() << "\n";
    return 1;
  }
  std::vector<std::string> docs;
  std::ifstream in(dir + "/corpus.jsonl");
  int64_t bytes = 0;
  for (std::string line; std::getline(in, line);) {
    docs.push_back(nlohmann::json::parse(line)["text"].get<std::string>());
    bytes += static_cast<int64_t>(docs.back().size());
  }
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  for (const unsigned threads : {1u, cores}) {
    double best = 1e30;
    std::vector<std::vector<int32_t>> encoded(docs.size());
    for (int round = 0; round < 3; ++round) {
      const auto start = Clock::now();
      std::atomic<size_t> next{0};
      auto work = [&] {
        for (size_t i = next++; i < docs.size(); i = next++) encoded[i] = (*tok)->Encode(docs[i]);
      };
      std::vector<std::thread> pool;
      for (unsigned t = 1; t < threads; ++t) pool.emplace_back(work);
      work();
      for (std::thread& t : pool) t.join();
      best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
    }
    int64_t tokens = 0;
    for (const auto& ids : encoded) tokens += static_cast<int64_t>(ids.size());
    std::cout << nlohmann::json{{"impl", "flexfed"}, {"threads", threads}, {"bytes", bytes}, {"tokens", tokens},
                                {"seconds", best}, {"mb_per_s", bytes / best / 1e6}, {"ids_sha256", IdsDigest(encoded)}}
                     .dump()
              << std::endl;
  }
  return 0;
}
