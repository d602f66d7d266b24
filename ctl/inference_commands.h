// flexfedctl's local model tools: merge (anchor + expert modules → HF flex_olmo checkpoint),
// eval (loss and bits per byte per text set), generate (streaming text), routing (which expert
// each token goes to; per-domain routing fractions). All take --allow/--exclude expert sets.
#pragma once

#include <CLI/CLI.hpp>

#include <string>

#include "absl/status/status.h"

namespace flexfed::cli {

// A local command's end: with an error, "flexfedctl COMMAND: error: MESSAGE" on stderr and exit 1.
void ExitOnError(const std::string& command, const absl::Status& status);

void AddInferenceCommands(CLI::App& app);

}  // namespace flexfed::cli
