// The next-token cross-entropy of the training step, computed without the whole [tokens,
// vocabulary] logit matrix: docs/PERFORMANCE.md ("Memory that scales with tokens").
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace flexfed {

// Per-token negative log-likelihood, nats, fp32: nll[n] = logsumexp(hidden[n]·Wᵀ) − hidden[n]·W[target[n]].
// hidden: [N, H] (the final norm's output), weight: [V, H] (the output head), targets: [N] int64.
// The logits are formed `chunk_tokens` rows at a time in the dtype matrix products run in (autocast's
// when it is on for hidden's device, else hidden's), reduced in fp32 and dropped. With a frozen
// head (the owner's) the forward also forms each chunk's (softmax − one-hot)·W while it has the
// logits, and the backward scales those rows by the incoming gradient; with a trained head the
// backward forms each chunk again and takes (softmax − one-hot)·g into both gradients. So memory
// holds one [chunk_tokens, V] block instead of [N, V] fp32 logits, their softmax and its gradient.
// The values equal log_softmax + gather on the whole logits computed in the same dtype, to fp32
// rounding. chunk_tokens <= 0 chooses DefaultLossChunk(V).
at::Tensor ChunkedCrossEntropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               int64_t chunk_tokens = 0);

// Rows per chunk: a [rows, V] fp32 block of about 128 MiB, at least 64 rows.
int64_t DefaultLossChunk(int64_t vocab_size);

}  // namespace flexfed
