// `flexfedctl logits`: run a checkpoint on given token ids and write the logits, for comparing
// FlexFed with another implementation (transformers, vLLM, ...). See docs/CLI.md.
#pragma once

#include <CLI/CLI.hpp>

namespace flexfed::cli {

// Adds the subcommand to `app`; its callback runs the command and exits with its status.
void AddLogitsCommand(CLI::App& app);

}  // namespace flexfed::cli
