// What the coordinator's gRPC handlers share (coordinator/service.cpp, coordinator/transfer_streams.cpp):
// the objects every call uses, and the two halves of authorizing a caller. Private to coordinator/.
#pragma once

#include <grpcpp/grpcpp.h>

#include <string>

#include "absl/status/statusor.h"
#include "coordinator/call_limits.h"
#include "coordinator/coordinator.h"
#include "coordinator/work_queue.h"

namespace flexfed {

// Owned by CoordinatorServer; they outlive every call.
struct ServiceParts {
  Coordinator* coordinator = nullptr;
  WorkQueue* work = nullptr;
  ChunkSlots* slots = nullptr;
  StreamWatchdog* watchdog = nullptr;
  InFlightLimit* streams = nullptr;      // transfer streams per caller
  InFlightLimit* calls = nullptr;        // unary calls per caller
  InFlightLimit* enrollments = nullptr;  // enrollments in flight, all callers together (key "")
};

// The first half, cheap and run on gRPC's thread before any work is queued for the call: the
// protocol version, and who the client certificate (verified by TLS against the project CA) names,
// as "role/id". A caller without a certificate is refused here, so it cannot queue work.
absl::StatusOr<std::string> CallerOf(grpc::CallbackServerContext* ctx);

// The second half, on the work queue: the caller's version and identity against the database (known
// owner, not revoked, its current certificate). `role` "" = any authenticated caller; "admin" =
// operators only. `pem_out` receives the caller's certificate, for streams that check it again on
// every message.
absl::StatusOr<PeerIdentity> Authorize(Coordinator* c, grpc::CallbackServerContext* ctx, const std::string& role,
                                       std::string* pem_out = nullptr);

// An exception that reached a handler's boundary: logged (one JSON line on stderr) and answered
// INTERNAL with a short message.
absl::Status HandlerFailed(grpc::CallbackServerContext* ctx, const char* what);

// The refusal for a caller over one of its InFlightLimits.
absl::Status TooManyInFlight(const std::string& what, const std::string& caller, int limit);

}  // namespace flexfed
