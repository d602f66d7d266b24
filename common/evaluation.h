// Loss and bits per byte of a model on packed text (used by validation during training and by
// the `eval` commands).
#pragma once

#include <vector>

#include "common/data.h"
#include "common/model.h"
#include "common/tokenizer.h"

namespace flexfed {

struct EvalResult {
  double loss = 0;           // mean next-token cross-entropy, nats
  double bits_per_byte = 0;  // total NLL / ln 2 / UTF-8 bytes of the predicted tokens
  int64_t tokens = 0;
  int64_t bytes = 0;
};

// Evaluates sequences `indices` of `data` in batches of `batch_size`, gradients off.
EvalResult Evaluate(const FlexOlmoModel& model, const PackedSequences& data, const std::vector<int64_t>& indices,
                    int64_t batch_size, const Tokenizer& tokenizer, const Routing& routing = {});

}  // namespace flexfed
