// The coordinator's gRPC surface (callback API): Enrollment, Owner and Admin services over one
// mTLS port. Every handler first checks the caller's protocol version and identity (Authorize),
// then calls Coordinator — on a work queue, so that gRPC's callback threads never block. The version check lives there rather than in a server interceptor
// because a gRPC C++ interceptor cannot end a call with a readable status, only cancel it.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "coordinator/coordinator.h"
#include "coordinator/work_queue.h"
#include "flexfed/v1/version.h"

namespace flexfed {

inline constexpr int kMaxMessageBytes = 16 << 20;

struct ServerOptions {
  std::string listen = "0.0.0.0:7443";
  std::string ca_cert_pem;
  std::string server_cert_pem;
  std::string server_key_pem;
  int idle_timeout_seconds = 300;  // a stream with no progress for this long is dropped
  int work_threads = 0;            // threads for blocking work (coordinator/work_queue.h); 0: max(8, 2 × cores)
  // Chunks (≤ 8 MiB, 4 MiB from FlexFed clients) all transfers together hold in memory, and how many
  // of them one caller's streams may hold (coordinator/work_queue.h ChunkSlots).
  int chunk_slots = 12;
  int chunk_slots_per_caller = 4;
  // Bytes a stream may have in flight unread (its HTTP/2 window): 8 MiB covers 640 Mbit/s at 100 ms.
  int stream_window_mib = 16;
};

class CoordinatorServer {
 public:
  // Starts serving; `Coordinator` must outlive the server.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(Coordinator* coordinator, const ServerOptions& options);
  ~CoordinatorServer();
  int port() const { return port_; }
  void Shutdown();
  void Wait() { server_->Wait(); }

 private:
  CoordinatorServer() = default;
  std::unique_ptr<WorkQueue> work_;  // declared first: outlives the server and its calls
  std::unique_ptr<ChunkSlots> slots_;
  std::unique_ptr<grpc::Service> enrollment_, owner_, admin_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

grpc::Status ToGrpc(const absl::Status& status);
absl::Status FromGrpc(const grpc::Status& status);
// "1.0" → OK; another major → FailedPrecondition naming both versions.
absl::Status CheckProtocolVersion(const std::string& client_version);

}  // namespace flexfed
