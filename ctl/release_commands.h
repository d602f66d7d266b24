// flexfedctl release build | list | show | export: immutable release manifests at the coordinator
// (common/core/release.h) and their export as an HF checkpoint directory (common/merge/merge.h).
#pragma once

#include <CLI/CLI.hpp>

namespace flexfed::cli {

void AddReleaseCommands(CLI::App& app);

}  // namespace flexfed::cli
