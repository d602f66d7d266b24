// The mixture-of-experts dispatch ops (docs/METHOD.md §2, "MoE block") as plain functions over raw
// buffers: one argument struct per op, shared by the CUDA launchers (kernels/*.cuh, device pointers)
// and the CPU references declared here (host pointers, kernels/moe_reference.cpp). The references
// are the semantics: each kernel must produce what its reference produces, up to fp32 rounding order,
// and tests/kernels/ checks exactly that. Torch-free and CUDA-free, so every build has the references.
//
// Dimensions: N=tokens, E=experts, K=experts per token, M=N·K routed slots, H=hidden, F=FFN width.
// A slot s = n·K + j is token n's j-th choice (j = 0 is its most probable expert).
// Positions p ∈ [0, M) order the slots by expert, and by slot within an expert (a stable sort), so
// expert e's slots are the contiguous range [offsets[e], offsets[e + 1]).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace flexfed::kernels {

// Hidden-state element type of the data-moving ops. Router logits and weights are always fp32.
enum class DType { kF32, kBF16 };

inline size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// Limits of the kernels (their numbered comments say why).
inline constexpr int kMaxExperts = 256;

// (1) Router: per token, logits_out = logits_in + (e ≥ 1 ? min(bias[e], 0) : 0), -inf where the
// expert is not allowed; p = softmax(logits_out) (exp(l - max) / Σ); the K largest p in descending
// order, ties to the lower expert index (NaN ranks below every number, so indices stay valid);
// weights = those p, divided by their sum when `normalize`.
// Preconditions: 1 ≤ K ≤ E ≤ kMaxExperts and at least one allowed expert.
struct RouterArgs {
  const float* logits_in = nullptr;  // [N, E] x·W_rᵀ in fp32
  const float* bias = nullptr;       // [E] or null (no bias); entry 0 (the public expert) is ignored
  const uint8_t* allowed = nullptr;  // [E] nonzero = allowed, or null (all allowed)
  float* logits_out = nullptr;       // [N, E]; may alias logits_in
  float* weights = nullptr;          // [N, K]
  int32_t* indices = nullptr;        // [N, K]
  int64_t tokens = 0;
  int experts = 0;
  int top_k = 0;
  bool normalize = false;
};

// Router backward: d logits_out from d weights, through the top-k selection and the softmax.
// With G_e = the weight gradient of the slot that chose e (0 if none; for `normalize`,
// (dw_j − Σ_i dw_i·w_i) / S with S the selected p's sum), grad_logits_e = p_e·(G_e − Σ_f p_f·G_f).
// The bias and logits_in gradients follow from it (the bias's through min(b, 0)) and are the caller's.
struct RouterBackwardArgs {
  const float* logits = nullptr;        // [N, E] the forward's logits_out
  const int32_t* indices = nullptr;     // [N, K]
  const float* weights = nullptr;       // [N, K] the forward's weights
  const float* grad_weights = nullptr;  // [N, K]
  float* grad_logits = nullptr;         // [N, E]
  int64_t tokens = 0;
  int experts = 0;
  int top_k = 0;
  bool normalize = false;
};

// (2) Align: counts[e] = slots routed to e; offsets = exclusive scan of counts (offsets[E] = M);
// sorted_slot[p] = the slot at position p; slot_position[s] = the position of slot s.
// Preconditions: 0 ≤ indices[s] < E ≤ kMaxExperts; M < 2³¹.
struct AlignArgs {
  const int32_t* indices = nullptr;  // [M] (the router's [N, K])
  int32_t* counts = nullptr;         // [E]
  int32_t* offsets = nullptr;        // [E + 1]
  int32_t* sorted_slot = nullptr;    // [M]
  int32_t* slot_position = nullptr;  // [M]
  void* workspace = nullptr;         // AlignWorkspaceBytes(M, E) bytes (CUDA only; the reference needs none)
  int64_t slots = 0;
  int experts = 0;
};

// Gather: rows[p] = x[sorted_slot[p] / K], so each expert's tokens are contiguous.
struct GatherArgs {
  const void* x = nullptr;              // [N, H]
  const int32_t* sorted_slot = nullptr;  // [M]
  void* rows = nullptr;                  // [M, H]
  int64_t slots = 0;
  int64_t hidden = 0;
  int top_k = 0;
  DType dtype = DType::kF32;
};

// Gather backward (its adjoint): grad_x[n] = Σ_j grad_rows[slot_position[n·K + j]], summed in fp32
// in slot order and rounded once.
struct GatherBackwardArgs {
  const void* grad_rows = nullptr;         // [M, H]
  const int32_t* slot_position = nullptr;  // [M]
  void* grad_x = nullptr;                  // [N, H]
  int64_t tokens = 0;
  int64_t hidden = 0;
  int top_k = 0;
  DType dtype = DType::kF32;
};

// (3) Combine: out[n] = Σ_j weights[n, j] · rows[slot_position[n·K + j]], summed in fp32 in slot
// order and rounded once.
struct CombineArgs {
  const void* rows = nullptr;              // [M, H] the experts' outputs, in position order
  const float* weights = nullptr;          // [N, K]
  const int32_t* slot_position = nullptr;  // [M]
  void* out = nullptr;                     // [N, H]
  int64_t tokens = 0;
  int64_t hidden = 0;
  int top_k = 0;
  DType dtype = DType::kF32;
};

// Combine backward: for the slot s = sorted_slot[p] of token n = s / K,
// grad_rows[p] = weights[s] · grad_out[n] (rounded to dtype) and grad_weights[s] = Σ_h grad_out[n, h] · rows[p, h]
// (fp32).
struct CombineBackwardArgs {
  const void* grad_out = nullptr;        // [N, H]
  const void* rows = nullptr;            // [M, H]
  const float* weights = nullptr;        // [N, K]
  const int32_t* sorted_slot = nullptr;  // [M]
  void* grad_rows = nullptr;             // [M, H]
  float* grad_weights = nullptr;         // [N, K]
  int64_t slots = 0;
  int64_t hidden = 0;
  int top_k = 0;
  DType dtype = DType::kF32;
};

// (4) SwiGLU activation: out = silu(gate) · up, elementwise in fp32, rounded once. All [count].
struct SwiGluArgs {
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
  int64_t count = 0;
  DType dtype = DType::kF32;
};

// SwiGLU backward: with s = sigmoid(g), grad_gate = grad_out · up · s · (1 + g·(1 − s)) and
// grad_up = grad_out · g · s. All [count].
struct SwiGluBackwardArgs {
  const void* grad_out = nullptr;
  const void* gate = nullptr;
  const void* up = nullptr;
  void* grad_gate = nullptr;
  void* grad_up = nullptr;
  int64_t count = 0;
  DType dtype = DType::kF32;
};

// The CPU references (host pointers). They check their preconditions and throw
// std::invalid_argument naming the broken one.
void RouterReference(const RouterArgs& a);
void RouterBackwardReference(const RouterBackwardArgs& a);
void AlignReference(const AlignArgs& a);
void GatherReference(const GatherArgs& a);
void GatherBackwardReference(const GatherBackwardArgs& a);
void CombineReference(const CombineArgs& a);
void CombineBackwardReference(const CombineBackwardArgs& a);
void SwiGluReference(const SwiGluArgs& a);
void SwiGluBackwardReference(const SwiGluBackwardArgs& a);

// bf16 ↔ fp32 as the kernels convert (round to nearest even; NaN stays NaN). Inline: the
// references' loops (AdamW's over whole parameters) vectorise through them.
inline float Bf16ToFloat(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even
  return static_cast<uint16_t>(nan ? (bits >> 16) | 0x40u : rounded);     // a NaN stays a (quiet) NaN
}

}  // namespace flexfed::kernels
