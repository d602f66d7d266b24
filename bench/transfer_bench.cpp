// Transfer benchmark, FlexFed side: upload then download a file of --size-mib through a running
// coordinator with the real client (manifest hashing, chunk checks, durable writes, assembly and
// all). Prints one JSON line. bench/run_transfer_bench.sh starts the coordinator, runs this and a
// raw-TLS baseline on the same machine, and reads the coordinator's peak RSS.
#include <CLI/CLI.hpp>

#include <chrono>
#include <fstream>
#include <iostream>
#include <random>

#include "common/client/coordinator_client.h"
#include <nlohmann/json.hpp>

using namespace flexfed;

int main(int argc, char** argv) {
  CLI::App app{"FlexFed transfer benchmark (one JSON line)"};
  std::string address, identity, dir = "/tmp";
  int size_mib = 1024;
  app.add_option("--coordinator", address)->required();
  app.add_option("--identity", identity, "Admin identity folder")->required();
  app.add_option("--dir", dir, "Scratch folder");
  app.add_option("--size-mib", size_mib);
  CLI11_PARSE(app, argc, argv);
  const std::string src = dir + "/transfer-src.bin", dst = dir + "/transfer-dst.bin";
  {
    std::ofstream out(src, std::ios::binary);
    std::mt19937_64 rng(1);
    std::vector<uint64_t> block(1 << 17);  // 1 MiB
    for (int i = 0; i < size_mib; ++i) {
      for (uint64_t& x : block) x = rng();
      out.write(reinterpret_cast<const char*>(block.data()), static_cast<std::streamsize>(block.size() * 8));
    }
  }
  absl::StatusOr<ClientIdentity> id = ClientIdentity::Load(identity);
  if (!id.ok()) return 1;
  auto client = CoordinatorClient::Connect(address, *id);
  if (!client.ok()) return 1;
  using Clock = std::chrono::steady_clock;
  auto t0 = Clock::now();
  absl::StatusOr<v1::CommitUploadResponse> up = (*client)->UploadFile(src, "", nullptr);
  const double up_s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!up.ok()) {
    std::cerr << up.status().message() << "\n";
    return 1;
  }
  std::remove(dst.c_str());
  t0 = Clock::now();
  absl::Status down = (*client)->DownloadBlob(up->blob().sha256(), dst, nullptr);
  const double down_s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!down.ok()) {
    std::cerr << down.message() << "\n";
    return 1;
  }
  std::remove(src.c_str());
  std::remove(dst.c_str());
  std::cout << nlohmann::json({{"size_mib", size_mib}, {"upload_s", up_s}, {"download_s", down_s},
                               {"upload_mib_s", size_mib / up_s}, {"download_mib_s", size_mib / down_s}})
                   .dump()
            << std::endl;
  return 0;
}
