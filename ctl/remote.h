// What flexfedctl's commands against a running coordinator share: connecting with the admin
// identity, calling a unary admin RPC, failing with one clear line.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/client/coordinator_client.h"

namespace flexfed::cli {

[[noreturn]] inline void Fail(const std::string& command, const absl::Status& s) {
  std::cerr << "flexfedctl " << command << ": error: " << s.message() << "\n";
  std::exit(1);
}

struct Remote {
  std::string coordinator = std::getenv("FLEXFED_COORDINATOR") ? std::getenv("FLEXFED_COORDINATOR") : "localhost:7443";
  std::string identity = std::getenv("FLEXFED_IDENTITY") ? std::getenv("FLEXFED_IDENTITY") : "";
  bool json = false;

  void AddOptions(CLI::App* cmd, bool listing) {
    cmd->add_option("--coordinator", coordinator, "host:port of the coordinator ($FLEXFED_COORDINATOR)");
    cmd->add_option("--identity", identity, "Admin identity folder (ca.crt, client.crt, client.key; $FLEXFED_IDENTITY)")->required(identity.empty());
    if (listing) cmd->add_flag("--json", json, "Print JSON");
  }
  std::unique_ptr<CoordinatorClient> Connect(const std::string& command) const {
    absl::StatusOr<ClientIdentity> id = ClientIdentity::Load(identity);
    if (!id.ok()) Fail(command, id.status());
    if (id->cert_pem.empty()) Fail(command, absl::NotFoundError(absl::StrCat(identity, ": no client.crt/client.key (made by `flexfedctl ca init`)")));
    absl::StatusOr<std::unique_ptr<CoordinatorClient>> c = CoordinatorClient::Connect(coordinator, *id);
    if (!c.ok()) Fail(command, c.status());
    return *std::move(c);
  }
};

// Calls a unary admin RPC; on error prints it and exits.
template <typename Req, typename Resp, typename Method>
inline Resp Call(const std::string& command, CoordinatorClient& client, Method method, const Req& request) {
  Resp response;
  std::unique_ptr<grpc::ClientContext> ctx = client.NewContext();
  absl::Status s = ToStatus((client.admin().*method)(ctx.get(), request, &response));
  if (!s.ok()) {
    if (absl::IsUnavailable(s)) s = absl::UnavailableError(absl::StrCat(s.message(), " (is the coordinator running and reachable?)"));
    Fail(command, s);
  }
  return response;
}

inline std::string When(int64_t unix) {
  if (unix == 0) return "-";
  std::time_t t = static_cast<std::time_t>(unix);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", std::gmtime(&t));
  return buf;
}

}  // namespace flexfed::cli
