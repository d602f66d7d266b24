// DP-SGD's parts (docs/PRIVACY.md): Poisson sampling of training sequences, per-sequence gradient
// norms of the trainable leaves from activations and output gradients (no per-sequence gradient is
// held), and the Gaussian noise. The training loop (common/train/training.cpp, DpStep) puts them
// together; common/core/dp_accountant.h counts the privacy spent.
//
// Dimensions: N = tokens of a micro-batch (B sequences of T), n = rows an expert ran on, H = hidden,
// F = FFN width.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "common/model/checkpoint.h"
#include "common/model/moe.h"

namespace flexfed {

// Step `step`'s Poisson sample of [0, n): each index independently with probability q, ascending.
// Deterministic in (seed, step) on every platform (SplitMix64 and geometric gaps), so a resumed run
// draws the same batches.
std::vector<int64_t> PoissonSample(int64_t n, double q, uint64_t seed, int64_t step);

// ‖Σ_{t ∈ s} g_t x_tᵀ‖² for each sequence s: the squared Frobenius norm of the gradient a linear
// layer y = x·Wᵀ gets from sequence s alone, from its inputs x [n, in] and output gradients g
// [n, out], where rows[i] / seq_len is row i's sequence (rows ascending). Per sequence, the cheaper
// of the "ghost" form Σ_{t,t'} (x_t·x_t')(g_t·g_t') and the explicit gᵀx. fp32 [B], added into `out`.
void AddLinearNormsSq(const at::Tensor& x, const at::Tensor& g, const at::Tensor& rows, int64_t seq_len, at::Tensor& out);

// ‖Σ_{t ∈ s} g_t x_t‖² per sequence for a vector parameter whose per-token gradient is g_t·x_t
// (a router row: g [N] the gradient of its logit, x [N, H] the router's input). fp32 [B], added.
void AddRowNormsSq(const at::Tensor& x, const at::Tensor& g, int64_t seq_len, at::Tensor& out);

// (Σ_{t ∈ s} g_t)² per sequence (a router bias). g: [N]. fp32 [B], added.
void AddScalarNormsSq(const at::Tensor& g, int64_t seq_len, at::Tensor& out);

// The factors c_s = min(1, C / ‖∇ℓ_s‖) that clip each sequence's gradient to norm C. norms_sq: [B].
at::Tensor ClipFactors(const at::Tensor& norms_sq, double max_grad_norm);

// Adds N(0, std²) to every element of each parameter's gradient, from a generator seeded by
// (seed, step) (on the parameters' device). std = 0 adds nothing (not even zeros).
void AddGaussianNoise(const std::vector<NamedTensor>& params, double std, uint64_t seed, int64_t step);

}  // namespace flexfed
