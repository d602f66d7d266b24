// Whether a written checkpoint computes, in Hugging Face transformers or vLLM, what FlexFed computes:
// said in one line by `merge` and `release export`. The one difference is the owners' negative router
// biases (docs/METHOD.md §3), which an HF checkpoint cannot carry: FlexFed keeps them in
// flexfed_extras.safetensors and applies them; transformers and vLLM compute the model without them.
// With held-out text, the line says how far apart the two models are on it (bits per byte).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include "absl/status/statusor.h"
#include "common/model/model.h"

namespace flexfed::cli {

struct HeldOutText {
  std::vector<std::string> paths;  // text, .jsonl or folders; empty: not measured
  int64_t seq_len = 256;
  int64_t max_sequences = 32;
  std::string cache_dir;
};

// --held-out, --held-out-sequences and --held-out-seq-len.
void AddHeldOutOptions(CLI::App* cmd, HeldOutText* held_out);

// `model` is what FlexFed computes from the checkpoint in `model_dir` (whose tokenizer reads the text).
absl::StatusOr<std::string> HfExactnessLine(const FlexOlmoModel& model, const std::string& model_dir,
                                            const HeldOutText& held_out);

}  // namespace flexfed::cli
