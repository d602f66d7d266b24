// Transfer benchmark, FlexFed side: upload then download --size-mib through a running coordinator
// with the real client (manifest hashing, chunk checks, durable writes, assembly and all), by one
// client or by --clients at once, each its own share. Prints one JSON line. bench/run_transfer_bench.sh starts the coordinator, runs this and a
// raw-TLS baseline on the same machine, and reads the coordinator's peak RSS.
#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <fstream>
#include <iostream>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/client/coordinator_client.h"
#include <nlohmann/json.hpp>

using namespace flexfed;

int main(int argc, char** argv) {
  CLI::App app{"FlexFed transfer benchmark (one JSON line)"};
  std::string address, identity, dir = "/tmp";
  int size_mib = 1024, clients = 1;
  app.add_option("--coordinator", address)->required();
  app.add_option("--identity", identity, "Admin identity folder")->required();
  app.add_option("--dir", dir, "Scratch folder");
  app.add_option("--size-mib", size_mib, "Bytes moved in all, split evenly between the clients");
  app.add_option("--clients", clients, "Clients transferring at once, each on its own connection with its own blob")
      ->check(CLI::Range(1, 64));
  CLI11_PARSE(app, argc, argv);
  absl::StatusOr<ClientIdentity> id = ClientIdentity::Load(identity);
  if (!id.ok()) return 1;
  // Each client's blob: size_mib / clients MiB of seeded random bytes (different seeds: different blobs).
  const int each_mib = std::max(1, size_mib / clients);
  std::vector<std::string> src, dst;
  for (int c = 0; c < clients; ++c) {
    src.push_back(absl::StrCat(dir, "/transfer-src-", c, ".bin"));
    dst.push_back(absl::StrCat(dir, "/transfer-dst-", c, ".bin"));
    std::ofstream out(src.back(), std::ios::binary);
    std::mt19937_64 rng(1 + c);
    std::vector<uint64_t> block(1 << 17);  // 1 MiB
    for (int i = 0; i < each_mib; ++i) {
      for (uint64_t& x : block) x = rng();
      out.write(reinterpret_cast<const char*>(block.data()), static_cast<std::streamsize>(block.size() * 8));
    }
  }
  std::vector<std::unique_ptr<CoordinatorClient>> conns;
  for (int c = 0; c < clients; ++c) {
    auto client = CoordinatorClient::Connect(address, *id);
    if (!client.ok()) return 1;
    conns.push_back(*std::move(client));
  }
  // Runs `work(c)` on every client at once; the wall time of all of them.
  std::atomic<bool> failed{false};
  auto all = [&](const std::function<absl::Status(int)>& work) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&, c] {
        if (absl::Status s = work(c); !s.ok()) {
          std::cerr << s.message() << "\n";
          failed = true;
        }
      });
    }
    for (std::thread& t : threads) t.join();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::vector<std::string> sha(clients);
  const double up_s = all([&](int c) -> absl::Status {
    absl::StatusOr<v1::CommitUploadResponse> up = conns[c]->UploadFile(src[c], "", nullptr);
    if (!up.ok()) return up.status();
    sha[c] = up->blob().sha256();
    return absl::OkStatus();
  });
  if (failed) return 1;
  for (const std::string& d : dst) std::remove(d.c_str());
  const double down_s = all([&](int c) { return conns[c]->DownloadBlob(sha[c], dst[c], nullptr); });
  if (failed) return 1;
  for (int c = 0; c < clients; ++c) {
    std::remove(src[c].c_str());
    std::remove(dst[c].c_str());
  }
  const double total_mib = static_cast<double>(each_mib) * clients;
  std::cout << nlohmann::json({{"size_mib", total_mib}, {"clients", clients}, {"upload_s", up_s}, {"download_s", down_s},
                               {"upload_mib_s", total_mib / up_s}, {"download_mib_s", total_mib / down_s}})
                   .dump()
            << std::endl;
  return 0;
}
