// The subcommands of flexfed-owner, one file each. Each Add*Command registers its options and a
// callback that runs the command and exits with its status (docs/CLI.md: 0 ok, 1 failed, 2 usage).
#pragma once

#include <CLI/CLI.hpp>

#include <string>

#include "absl/status/status.h"
#include "common/train/data.h"

namespace flexfed::owner {

void AddRouterInitCommand(CLI::App& app);
void AddEvalCommand(CLI::App& app);
void AddExportCommand(CLI::App& app);
void AddInspectCommand(CLI::App& app);
void AddAuditCommand(CLI::App& app);
// enroll, pull, push, status (built with FLEXFED_SERVICES).
void AddNetworkCommands(CLI::App& app);

// Prints "flexfed-owner <command>: error: <message>" and exits 1 when `status` is not OK.
void ExitOnError(const std::string& command, const absl::Status& status);
// $FLEXFED_CACHE_DIR, else $XDG_CACHE_HOME/flexfed, else ~/.cache/flexfed; + "/tokens".
using flexfed::DefaultTokenCacheDir;  // common/train/data.h

}  // namespace flexfed::owner
