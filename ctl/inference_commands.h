// flexfedctl's local model tools: merge (anchor + expert modules → HF flex_olmo checkpoint),
// eval (loss and bits per byte per text set), generate (streaming text), routing (which expert
// each token goes to; per-domain routing fractions). All take --allow/--exclude expert sets.
#pragma once

#include <CLI/CLI.hpp>

namespace flexfed::cli {

void AddInferenceCommands(CLI::App& app);

}  // namespace flexfed::cli
