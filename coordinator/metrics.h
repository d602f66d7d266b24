// Prometheus metrics of a coordinator, computed at scrape time from its own state (no second
// bookkeeping): bytes in/out, open upload sessions, rejected uploads by reason, experts by state,
// owners' and the server's certificate expiry. Served with a /health endpoint by prometheus-cpp.
// Note: civetweb (under prometheus-cpp) cannot start its threads in a process that also loads
// Debian's LibTorch ("Cannot create threads"), one more reason the coordinator stays torch-free.
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/exposer.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/coordinator.h"

namespace flexfed {

class CoordinatorMetrics final : public prometheus::Collectable {
 public:
  CoordinatorMetrics(Coordinator* coordinator, int64_t server_certificate_not_after)
      : coordinator_(coordinator), server_not_after_(server_certificate_not_after) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  Coordinator* coordinator_;
  int64_t server_not_after_;
};

// Answers /health with `flexfed_up 1` while the coordinator can read its metadata.
class HealthCheck final : public prometheus::Collectable {
 public:
  explicit HealthCheck(Coordinator* coordinator) : coordinator_(coordinator) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  Coordinator* coordinator_;
};

struct MetricsServer {
  std::unique_ptr<prometheus::Exposer> exposer;
  std::shared_ptr<CoordinatorMetrics> metrics;
  std::shared_ptr<HealthCheck> health;
  int port = 0;
};

// Serves /metrics and /health on `listen` (host:port; port 0 picks one).
absl::StatusOr<MetricsServer> StartMetrics(Coordinator* coordinator, const std::string& listen, int64_t server_not_after);

}  // namespace flexfed
