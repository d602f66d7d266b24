// The coordinator's gRPC surface (callback API): Enrollment, Owner and Admin services over one
// mTLS port. Every handler first admits the call on gRPC's thread (protocol version, the verified
// certificate's identity, the caller's share of calls in flight: coordinator/call_limits.h), then
// authorizes it against the database and calls Coordinator — on a work queue, so that gRPC's
// callback threads never block. The version check lives there rather than in a server interceptor
// because a gRPC C++ interceptor cannot end a call with a readable status, only cancel it.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>

#include "coordinator/call_limits.h"
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
  int idle_timeout_seconds = 300;  // a stream waiting this long on its peer is dropped (StreamWatchdog)
  int work_threads = 0;            // threads for blocking work (coordinator/work_queue.h); 0: max(8, 2 × cores)
  // Chunks (≤ 8 MiB, 4 MiB from FlexFed clients) all transfers together hold in memory, and how many
  // of them one caller's streams may hold (coordinator/work_queue.h ChunkSlots).
  int chunk_slots = 12;
  int chunk_slots_per_caller = 4;
  // Bytes a stream may have in flight unread (its HTTP/2 window): 8 MiB covers 640 Mbit/s at 100 ms.
  int stream_window_mib = 8;
  // Calls one caller ("role/id" of its certificate) may have in progress at once, over all its
  // connections: transfer streams, and unary calls; enrollments in progress for all callers
  // together; streams one connection may open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
  int streams_per_caller = 8;
  int calls_per_caller = 32;
  int enrollments_in_flight = 8;
  int streams_per_connection = 32;
  // What gRPC may hold in memory for all connections together (grpc::ResourceQuota).
  int memory_quota_mib = 2048;
  std::function<int64_t()> steady_clock_ms;  // the watchdog's clock; empty = steady_clock (tests inject one)
};

class CoordinatorServer {
 public:
  // Starts serving; `Coordinator` must outlive the server.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(Coordinator* coordinator, const ServerOptions& options);
  ~CoordinatorServer();
  int port() const { return port_; }
  // Streams the watchdog dropped for waiting on their peer too long, and chunk slots free now.
  int64_t idle_streams_dropped() const { return watchdog_->dropped(); }
  int free_chunk_slots() const { return slots_->free_slots(); }
  int transfer_streams_of(const std::string& caller) const { return streams_->InFlight(caller); }
  void Shutdown();
  void Wait() { server_->Wait(); }

 private:
  CoordinatorServer() = default;
  std::unique_ptr<WorkQueue> work_;  // declared first: outlives the server and its calls
  std::unique_ptr<ChunkSlots> slots_;
  std::unique_ptr<StreamWatchdog> watchdog_;
  std::unique_ptr<InFlightLimit> streams_, calls_, enrollments_;
  std::unique_ptr<grpc::ResourceQuota> quota_;
  std::unique_ptr<grpc::Service> enrollment_, owner_, admin_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

grpc::Status ToGrpc(const absl::Status& status);
absl::Status FromGrpc(const grpc::Status& status);
// "1.0" → OK; another major → FailedPrecondition naming both versions.
absl::Status CheckProtocolVersion(const std::string& client_version);

}  // namespace flexfed
