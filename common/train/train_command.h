// The training command both CLIs offer, over one Trainer (common/train/training.h):
// flexfed-owner `train` (an owner's expert; the dense ablation; pretraining an anchor) and
// flexfedctl `router-tune` (the optional router tuning of a merge on public proxy data,
// docs/METHOD.md §4). Settings: defaults, then --config FILE or, with --resume, the run's own,
// then the flags given; Ctrl-C saves a checkpoint; progress on a live line or plain lines.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

#include "absl/status/status.h"

namespace flexfed {

enum class TrainCommandKind { kOwner, kRouterTuning };

// Registers `train` (kOwner) or `router-tune` (kRouterTuning) on `app`; its callback runs the
// command and hands the result to `exit_on_error(command name, status)`.
void AddTrainCommand(CLI::App& app, TrainCommandKind kind,
                     const std::function<void(const std::string&, const absl::Status&)>& exit_on_error);

}  // namespace flexfed
