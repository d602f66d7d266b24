// flexfed-coordinator: the service operators run (docs/OPERATOR_GUIDE.md).
#include <CLI/CLI.hpp>

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "common/core/identity.h"
#include "coordinator/coordinator.h"
#include "coordinator/metrics.h"
#include "coordinator/service.h"
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using namespace flexfed;

namespace {

struct Options {
  std::string config;
  std::string data_dir = "/var/lib/flexfed";
  std::string listen = "0.0.0.0:7443";
  std::string ca_dir = "/etc/flexfed/ca";
  std::vector<std::string> hostnames = {"localhost", "127.0.0.1"};
  std::string port_file;
  std::string metrics_listen = "127.0.0.1:9464";
  int idle_timeout = 300;
  int certificate_days = 365;
  bool verify_blobs = true;
  double max_extraction = -1;  // operator privacy policy (docs/PRIVACY.md); < 0: not required
  double max_dp_epsilon = -1;
  // Limits (docs/PROTOCOL.md, "Limits"; ServerOptions in coordinator/service.h).
  int streams_per_caller = 8, calls_per_caller = 32, streams_per_connection = 32, enrollments_in_flight = 8;
  int memory_quota_mib = 2048;
};

// Structured log line on stderr (journald and collectors parse it): time, level, event, fields.
void Log(const std::string& level, const std::string& event, nlohmann::json fields = nlohmann::json::object()) {
  const std::time_t now = std::time(nullptr);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  fields["time"] = when;
  fields["level"] = level;
  fields["event"] = event;
  std::cerr << fields.dump() << std::endl;
}

void LogFinding(const v1::StoreFinding& f) {
  Log(f.repaired() ? "warning" : "error", "store_finding",
      {{"kind", f.kind()}, {"object", f.object()}, {"detail", f.detail()}, {"repaired", f.repaired()}});
}

[[noreturn]] void Fail(const std::string& message) {
  Log("error", "startup_failed", {{"message", message}});
  std::cerr << "flexfed-coordinator: error: " << message << "\n";
  std::exit(1);
}

// The server's own certificate, issued by the project CA for `hostnames`; re-issued when missing,
// when the host names change, or within 30 days of expiry.
std::pair<std::string, std::string> ServerCertificate(const Options& o, const std::string& ca_key, const std::string& ca_cert) {
  const fs::path crt = fs::path(o.data_dir) / "server.crt", key = fs::path(o.data_dir) / "server.key",
                 hosts = fs::path(o.data_dir) / "server.hosts";
  std::string want_hosts;
  for (const std::string& h : o.hostnames) want_hosts += h + "\n";
  absl::StatusOr<std::string> have_crt = ReadFile(crt.string()), have_key = ReadFile(key.string()),
                              have_hosts = ReadFile(hosts.string());
  if (have_crt.ok() && have_key.ok() && have_hosts.ok() && *have_hosts == want_hosts) {
    absl::StatusOr<PeerIdentity> id = ReadIdentity(*have_crt);
    if (id.ok() && id->not_after_unix > std::time(nullptr) + 30 * 86400) return {*have_crt, *have_key};
  }
  absl::StatusOr<KeyAndCsr> req = MakeKeyAndCsr("coordinator");
  if (!req.ok()) Fail(std::string(req.status().message()));
  absl::StatusOr<IssuedCertificate> cert = SignCsr(ca_key, ca_cert, req->csr_pem, "coordinator", "server", o.certificate_days, o.hostnames);
  if (!cert.ok()) Fail(std::string(cert.status().message()));
  for (auto [path, text] : {std::pair{key, req->key_pem}, {crt, cert->certificate_pem}, {hosts, want_hosts}}) {
    if (absl::Status s = WriteFileAtomically(path.string(), text); !s.ok()) Fail(std::string(s.message()));
  }
  fs::permissions(key, fs::perms::owner_read | fs::perms::owner_write);
  return {cert->certificate_pem, req->key_pem};
}

ServerOptions ServerOptionsOf(const Options& o, const std::string& ca_cert, const std::string& cert, const std::string& key) {
  ServerOptions s{o.listen, ca_cert, cert, key, o.idle_timeout};
  s.streams_per_caller = o.streams_per_caller;
  s.calls_per_caller = o.calls_per_caller;
  s.streams_per_connection = o.streams_per_connection;
  s.enrollments_in_flight = o.enrollments_in_flight;
  s.memory_quota_mib = o.memory_quota_mib;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  // Chunks are 4 MiB buffers allocated and freed on many gRPC threads. glibc's adaptive mmap
  // threshold would soon serve them from per-thread arenas that never shrink; a fixed threshold
  // keeps them mmapped, so their memory returns to the system when freed.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  Options o;
  CLI::App app{"flexfed-coordinator: collects FlexOlmo experts from data owners over mTLS"};
  app.add_option("--config", o.config, "Settings file (JSON with the long option names as keys)")->check(CLI::ExistingFile);
  auto* data = app.add_option("--data-dir", o.data_dir, "Metadata, blobs and the audit log");
  auto* listen = app.add_option("--listen", o.listen, "host:port to serve on (port 0: any free port)");
  auto* ca = app.add_option("--ca-dir", o.ca_dir, "Project CA (ca.key, ca.crt from `flexfedctl ca init`)");
  auto* hosts = app.add_option("--hostname", o.hostnames, "Names and addresses for the server certificate");
  app.add_option("--port-file", o.port_file, "Write the chosen port here once serving");
  auto* metrics = app.add_option("--metrics-listen", o.metrics_listen, "host:port for /metrics and /health (empty: off)");
  auto* idle = app.add_option("--idle-timeout", o.idle_timeout, "Seconds without progress before a peer is dropped");
  auto* days = app.add_option("--certificate-days", o.certificate_days, "Validity of certificates issued at enrollment");
  auto* verify = app.add_flag("!--no-verify-blobs", o.verify_blobs, "Skip hashing every stored blob in the background after start-up");
  auto* max_extraction = app.add_option("--max-extraction", o.max_extraction,
                                        "Accept only modules recording a complete extraction audit with at most this rate (e.g. 0.01)")
                             ->check(CLI::Range(0.0, 1.0));
  auto* max_epsilon = app.add_option("--max-dp-epsilon", o.max_dp_epsilon,
                                     "Accept only modules trained with differential privacy at most at this ε")
                          ->check(CLI::PositiveNumber);
  constexpr int kMaxLimit = 1 << 20;
  struct Limit {
    const char* name;
    int* value;
    const char* help;
    CLI::Option* option = nullptr;
  };
  std::vector<Limit> limits = {
      {"streams-per-caller", &o.streams_per_caller, "Transfer streams one caller (certificate) may have open at once"},
      {"calls-per-caller", &o.calls_per_caller, "Other calls one caller may have in progress at once"},
      {"streams-per-connection", &o.streams_per_connection, "Streams one connection may open at once (HTTP/2)"},
      {"enrollments-in-flight", &o.enrollments_in_flight, "Enrollments in progress, all callers together"},
      {"memory-quota-mib", &o.memory_quota_mib, "Memory gRPC may hold for all connections together (MiB)"}};
  for (Limit& l : limits) {
    l.option = app.add_option(std::string("--") + l.name, *l.value, l.help)->check(CLI::Range(1, kMaxLimit))->capture_default_str();
  }
  app.footer("Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM), 1 on a start-up error, 2 bad usage.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (!o.config.empty()) {
    nlohmann::json j = nlohmann::json::parse(*ReadFile(o.config), nullptr, false);
    if (j.is_discarded() || !j.is_object()) Fail(o.config + ": not a JSON object");
    for (const auto& [k, v] : j.items()) {
      try {
        const auto limit = std::find_if(limits.begin(), limits.end(), [&](const Limit& l) { return k == l.name; });
        if (limit != limits.end()) {
          if (limit->option->count() > 0) continue;  // the flag wins
          if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > kMaxLimit) {
            Fail(absl::StrCat(o.config, ": setting '", k, "' must be a whole number from 1 to ", kMaxLimit));
          }
          *limit->value = v.get<int>();
          continue;
        }
        if (k == "data-dir" && data->count() == 0) o.data_dir = v.get<std::string>();
        else if (k == "listen" && listen->count() == 0) o.listen = v.get<std::string>();
        else if (k == "ca-dir" && ca->count() == 0) o.ca_dir = v.get<std::string>();
        else if (k == "hostname" && hosts->count() == 0) o.hostnames = v.get<std::vector<std::string>>();
        else if (k == "idle-timeout" && idle->count() == 0) o.idle_timeout = v.get<int>();
        else if (k == "certificate-days" && days->count() == 0) o.certificate_days = v.get<int>();
        else if (k == "metrics-listen" && metrics->count() == 0) o.metrics_listen = v.get<std::string>();
        else if (k == "verify-blobs" && verify->count() == 0) o.verify_blobs = v.get<bool>();
        else if (k == "max-extraction" && max_extraction->count() == 0) o.max_extraction = v.get<double>();
        else if (k == "max-dp-epsilon" && max_epsilon->count() == 0) o.max_dp_epsilon = v.get<double>();
        else if (k != "data-dir" && k != "listen" && k != "ca-dir" && k != "hostname" && k != "idle-timeout" &&
                 k != "certificate-days" && k != "metrics-listen" && k != "verify-blobs" && k != "max-extraction" &&
                 k != "max-dp-epsilon") {
          Fail(absl::StrCat(o.config, ": unknown setting '", k, "'"));
        }
      } catch (const nlohmann::json::exception&) {
        Fail(absl::StrCat(o.config, ": setting '", k, "' has the wrong type"));
      }
    }
  }
  // Settings from the file are checked as the flags are.
  if (o.max_extraction != -1 && !(o.max_extraction >= 0 && o.max_extraction <= 1)) {
    Fail(absl::StrCat(o.config, ": max-extraction must be a rate between 0 and 1"));
  }
  if (o.max_dp_epsilon != -1 && !(o.max_dp_epsilon > 0)) Fail(absl::StrCat(o.config, ": max-dp-epsilon must be positive"));
  PrivacyPolicy policy;
  if (o.max_extraction >= 0) policy.max_extraction = o.max_extraction;
  if (o.max_dp_epsilon > 0) policy.max_dp_epsilon = o.max_dp_epsilon;
  absl::StatusOr<std::string> ca_key = ReadFile((fs::path(o.ca_dir) / "ca.key").string());
  absl::StatusOr<std::string> ca_cert = ReadFile((fs::path(o.ca_dir) / "ca.crt").string());
  if (!ca_key.ok() || !ca_cert.ok()) Fail(absl::StrCat(o.ca_dir, ": no ca.key/ca.crt; create the project CA with `flexfedctl ca init --dir ", o.ca_dir, "`"));
  std::error_code ec;
  fs::create_directories(o.data_dir, ec);
  if (ec) Fail(absl::StrCat(o.data_dir, ": cannot create: ", ec.message()));

  // Block the stop signals in every thread; the main thread waits for them below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto [server_cert, server_key] = ServerCertificate(o, *ca_key, *ca_cert);
  CoordinatorOptions settings;
  settings.data_dir = o.data_dir;
  settings.ca_key_pem = *ca_key;
  settings.ca_cert_pem = *ca_cert;
  settings.certificate_days = o.certificate_days;
  settings.privacy_policy = policy;
  absl::StatusOr<std::unique_ptr<Coordinator>> coordinator = Coordinator::Open(settings);
  if (!coordinator.ok()) Fail(std::string(coordinator.status().message()));
  absl::StatusOr<std::unique_ptr<CoordinatorServer>> server =
      CoordinatorServer::Start(coordinator->get(), ServerOptionsOf(o, *ca_cert, server_cert, server_key));
  if (!server.ok()) Fail(std::string(server.status().message()));
  MetricsServer metrics_server;
  if (!o.metrics_listen.empty()) {
    absl::StatusOr<MetricsServer> m = StartMetrics(coordinator->get(), o.metrics_listen, ReadIdentity(server_cert)->not_after_unix);
    if (!m.ok()) Fail(std::string(m.status().message()));
    metrics_server = *std::move(m);
  }
  Log("info", "serving", {{"port", (*server)->port()}, {"max_extraction", o.max_extraction}, {"max_dp_epsilon", o.max_dp_epsilon}, {"metrics_port", metrics_server.port}, {"data_dir", o.data_dir},
                          {"hostnames", o.hostnames}, {"orphans_removed", (*coordinator)->blobs().orphans_removed_at_open()},
                          {"store_repairs", (*coordinator)->startup_check().findings_size() - (*coordinator)->startup_check().unrepaired()},
                          {"store_problems", (*coordinator)->startup_check().unrepaired()}});
  for (const v1::StoreFinding& f : (*coordinator)->startup_check().findings()) LogFinding(f);
  // Every blob's bytes hashed against its name, while serving (a large store takes minutes);
  // findings are logged and counted in flexfed_store_problems. Stopped at shutdown.
  std::thread verifier;
  if (o.verify_blobs) {
    verifier = std::thread([c = coordinator->get()] {
      const auto t0 = std::chrono::steady_clock::now();
      absl::StatusOr<v1::CheckStoreResponse> r = c->CheckStore({"coordinator", "server", "", 0}, v1::CheckStoreRequest());
      if (!r.ok()) {
        if (!absl::IsCancelled(r.status())) Log("error", "store_check_failed", {{"message", std::string(r.status().message())}});
        return;
      }
      for (const v1::StoreFinding& f : r->findings()) LogFinding(f);
      Log(r->unrepaired() > 0 ? "error" : "info", "store_checked",
          {{"blobs", r->blobs()}, {"bytes_hashed", r->bytes_hashed()}, {"problems", r->unrepaired()},
           {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()}});
    });
  }
  if (!o.port_file.empty()) {
    // Line 1: the gRPC port; line 2: the metrics port (0 when off).
    if (absl::Status s = WriteFileAtomically(o.port_file, absl::StrCat((*server)->port(), "\n", metrics_server.port, "\n")); !s.ok()) {
      Fail(std::string(s.message()));
    }
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  Log("info", "stopping", {{"signal", sig}});
  (*coordinator)->Stop();  // a store check in progress ends, on its own thread or a call's
  (*server)->Shutdown();
  if (verifier.joinable()) verifier.join();
  Log("info", "stopped");
  return 0;
}
