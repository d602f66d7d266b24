// `flexfedctl random-checkpoint`: an OLMo-2-shaped checkpoint of a preset size (up to 7b) with random
// weights, written shard by shard, and optionally a tokenizer folder's files beside it — for trying a
// federation at a real model's size before the real anchor is at hand. See docs/CLI.md.
#pragma once

#include <CLI/CLI.hpp>

namespace flexfed::cli {

// Adds the subcommand to `app`; its callback runs the command and exits with its status.
void AddRandomCheckpointCommand(CLI::App& app);

}  // namespace flexfed::cli
