// `flexfedctl tokenize`: what a model's tokenizer makes of some text — ids, the piece each stands
// for, and the decoded round trip — for inspecting a tokenizer.json. See docs/CLI.md.
#pragma once

#include <CLI/CLI.hpp>

namespace flexfed::cli {

// Adds the subcommand to `app`; its callback runs the command and exits with its status.
void AddTokenizeCommand(CLI::App& app);

}  // namespace flexfed::cli
