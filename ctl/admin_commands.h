// flexfedctl's operator commands: ca init, owner, expert, anchor, upload, audit, status.
#pragma once

#include <CLI/CLI.hpp>

namespace flexfed::cli {

void AddAdminCommands(CLI::App& app);

}  // namespace flexfed::cli
