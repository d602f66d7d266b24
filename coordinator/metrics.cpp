#include "coordinator/metrics.h"

#include <prometheus/client_metric.h>
#include <prometheus/metric_family.h>
#include <prometheus/metric_type.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>

#include "absl/strings/str_cat.h"

namespace flexfed {
namespace {

prometheus::MetricFamily Family(const std::string& name, const std::string& help, prometheus::MetricType type) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  return f;
}

void Add(prometheus::MetricFamily& f, double value, std::vector<prometheus::ClientMetric::Label> labels = {}) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  if (f.type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(std::move(m));
}

}  // namespace

std::vector<prometheus::MetricFamily> CoordinatorMetrics::Collect() const {
  using prometheus::MetricType;
  CoordinatorCounters c = coordinator_->counters();
  std::vector<prometheus::MetricFamily> out;
  auto bytes_in = Family("flexfed_bytes_received_total", "Chunk bytes received from clients", MetricType::Counter);
  Add(bytes_in, static_cast<double>(c.bytes_in));
  auto bytes_out = Family("flexfed_bytes_sent_total", "Blob bytes sent to clients", MetricType::Counter);
  Add(bytes_out, static_cast<double>(c.bytes_out));
  auto committed = Family("flexfed_uploads_committed_total", "Expert modules accepted", MetricType::Counter);
  Add(committed, static_cast<double>(c.committed_uploads));
  auto rejected = Family("flexfed_uploads_rejected_total", "Uploads refused, by reason", MetricType::Counter);
  for (const auto& [reason, n] : c.rejected_uploads) Add(rejected, static_cast<double>(n), {{"reason", reason}});
  auto problems = Family("flexfed_store_problems", "Findings the last store check could not repair (flexfedctl status --check)",
                         MetricType::Gauge);
  Add(problems, static_cast<double>(c.store_problems));
  auto damaged = Family("flexfed_damaged_blob_reads_total",
                        "Chunks refused to a reader because the stored copy no longer matched its hash", MetricType::Counter);
  Add(damaged, static_cast<double>(c.damaged_reads));
  auto audit = Family("flexfed_audit_failures_total", "Events the audit log could not take (a full or read-only disk)",
                      MetricType::Counter);
  Add(audit, static_cast<double>(c.audit_failures));
  out = {bytes_in, bytes_out, committed, rejected, problems, damaged, audit};

  auto sessions = Family("flexfed_upload_sessions_open", "Upload sessions not yet committed", MetricType::Gauge);
  absl::StatusOr<v1::StatusResponse> status = coordinator_->Status();
  if (status.ok()) Add(sessions, static_cast<double>(status->open_uploads()));
  out.push_back(sessions);

  auto experts = Family("flexfed_experts", "Experts by state", MetricType::Gauge);
  absl::StatusOr<v1::ListExpertsResponse> list = coordinator_->ListExperts();
  std::map<std::string, int> by_state = {{"registered", 0}, {"uploaded", 0}, {"active", 0}, {"disabled", 0}, {"retired", 0}};
  if (list.ok()) {
    for (const v1::Expert& e : list->experts()) {
      std::string s = v1::ExpertState_Name(e.state()).substr(std::string("EXPERT_STATE_").size());
      for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      ++by_state[s];
    }
  }
  for (const auto& [state, n] : by_state) Add(experts, n, {{"state", state}});
  out.push_back(experts);

  auto expiry = Family("flexfed_certificate_expiry_seconds", "Unix time each certificate expires", MetricType::Gauge);
  Add(expiry, static_cast<double>(server_not_after_), {{"subject", "server"}});
  absl::StatusOr<v1::ListOwnersResponse> owners = coordinator_->ListOwners();
  if (owners.ok()) {
    for (const v1::OwnerInfo& o : owners->owners()) {
      if (o.enrolled() && !o.revoked()) Add(expiry, static_cast<double>(o.certificate_expires_unix()), {{"subject", absl::StrCat("owner/", o.owner_id())}});
    }
  }
  out.push_back(expiry);
  return out;
}

std::vector<prometheus::MetricFamily> HealthCheck::Collect() const {
  auto up = Family("flexfed_up", "1 while the coordinator can read its metadata", prometheus::MetricType::Gauge);
  Add(up, coordinator_->Status().ok() ? 1.0 : 0.0);
  return {up};
}

// civetweb cannot bind port 0: ask the kernel for a free port first (another process could take
// it in between; Start then fails with a clear error rather than serving elsewhere).
static std::string ResolvePortZero(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || listen.substr(colon + 1) != "0") return listen;
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  ::inet_pton(AF_INET, listen.substr(0, colon).c_str(), &addr.sin_addr);
  socklen_t len = sizeof addr;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return absl::StrCat(listen.substr(0, colon), ":", port);
}

absl::StatusOr<MetricsServer> StartMetrics(Coordinator* coordinator, const std::string& requested, int64_t server_not_after) {
  MetricsServer s;
  const std::string listen = ResolvePortZero(requested);
  try {
    // Several workers, and a short wait for a request's bytes: a client that connects and sends
    // nothing holds one worker for 2 s, not the only worker for civetweb's default 30 s.
    s.exposer = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
        "listening_ports", listen, "num_threads", "4", "request_timeout_ms", "2000"});
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", listen, ": ", e.what()));
  }
  s.metrics = std::make_shared<CoordinatorMetrics>(coordinator, server_not_after);
  s.health = std::make_shared<HealthCheck>(coordinator);
  s.exposer->RegisterCollectable(s.metrics, "/metrics");
  s.exposer->RegisterCollectable(s.health, "/health");
  std::vector<int> ports = s.exposer->GetListeningPorts();
  s.port = ports.empty() ? 0 : ports[0];
  return s;
}

}  // namespace flexfed
