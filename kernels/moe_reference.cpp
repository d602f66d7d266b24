// CPU references of the MoE dispatch ops: the semantics the CUDA kernels are tested against, written
// as plain loops in the order the comments in moe_ops.h give.
#include "kernels/moe_ops.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace flexfed::kernels {
namespace {

void Require(bool ok, const char* op, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
}

// Element access for the hidden-state dtypes.
float Load(const void* base, int64_t i, DType t) {
  if (t == DType::kF32) return static_cast<const float*>(base)[i];
  return Bf16ToFloat(static_cast<const uint16_t*>(base)[i]);
}

void Store(void* base, int64_t i, float v, DType t) {
  if (t == DType::kF32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = FloatToBf16(v);
  }
}

void RequireShape(const char* op, int64_t n, int experts, int top_k) {
  Require(n >= 0, op, "negative token count");
  Require(experts >= 1 && experts <= kMaxExperts, op,
          "experts must be in [1, " + std::to_string(kMaxExperts) + "], got " + std::to_string(experts));
  Require(top_k >= 1 && top_k <= experts, op,
          "top_k must be in [1, experts], got " + std::to_string(top_k) + " of " + std::to_string(experts));
}

// p = softmax(l) over one token's E logits, as exp(l - max) / Σ.
void Softmax(const float* l, int experts, float* p) {
  float max = -std::numeric_limits<float>::infinity();
  for (int e = 0; e < experts; ++e) max = std::fmax(max, l[e]);
  float sum = 0;
  for (int e = 0; e < experts; ++e) {
    p[e] = std::exp(l[e] - max);
    sum += p[e];
  }
  for (int e = 0; e < experts; ++e) p[e] /= sum;
}

// NaN (a diverged run) ranks below every probability, as in the kernel: indices stay valid.
float RankKey(float p) { return std::isnan(p) ? -0.5f : p; }

}  // namespace

void RouterReference(const RouterArgs& a) {
  RequireShape("router", a.tokens, a.experts, a.top_k);
  const int e_count = a.experts, k = a.top_k;
  bool any_allowed = a.allowed == nullptr;
  for (int e = 0; a.allowed != nullptr && e < e_count; ++e) any_allowed |= a.allowed[e] != 0;
  Require(any_allowed, "router", "no expert is allowed");
  std::vector<float> p(e_count);
  std::vector<bool> taken(e_count);
  for (int64_t n = 0; n < a.tokens; ++n) {
    float* l = a.logits_out + n * e_count;
    for (int e = 0; e < e_count; ++e) {
      float v = a.logits_in[n * e_count + e];
      if (a.bias != nullptr && e >= 1) v += std::fmin(a.bias[e], 0.0f);
      if (a.allowed != nullptr && a.allowed[e] == 0) v = -std::numeric_limits<float>::infinity();
      l[e] = v;
    }
    Softmax(l, e_count, p.data());
    std::fill(taken.begin(), taken.end(), false);
    float sum = 0;
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int e = 0; e < e_count; ++e) {
        if (!taken[e] && (best < 0 || RankKey(p[e]) > RankKey(p[best]))) best = e;  // strict: ties keep the lower
      }
      taken[best] = true;
      a.weights[n * k + j] = p[best];
      a.indices[n * k + j] = best;
      sum += p[best];
    }
    if (a.normalize) {
      for (int j = 0; j < k; ++j) a.weights[n * k + j] /= sum;
    }
  }
}

void RouterBackwardReference(const RouterBackwardArgs& a) {
  RequireShape("router backward", a.tokens, a.experts, a.top_k);
  const int e_count = a.experts, k = a.top_k;
  std::vector<float> p(e_count), g(e_count);
  for (int64_t n = 0; n < a.tokens; ++n) {
    Softmax(a.logits + n * e_count, e_count, p.data());
    const int32_t* idx = a.indices + n * k;
    const float* w = a.weights + n * k;
    const float* dw = a.grad_weights + n * k;
    float shift = 0, scale = 1;
    if (a.normalize) {
      float selected = 0, dot = 0;
      for (int j = 0; j < k; ++j) {
        selected += p[idx[j]];
        dot += dw[j] * w[j];
      }
      shift = dot;
      scale = 1.0f / selected;
    }
    std::fill(g.begin(), g.end(), 0.0f);
    for (int j = 0; j < k; ++j) g[idx[j]] = (dw[j] - shift) * scale;
    float dot = 0;
    for (int e = 0; e < e_count; ++e) dot += p[e] * g[e];
    for (int e = 0; e < e_count; ++e) a.grad_logits[n * e_count + e] = p[e] * (g[e] - dot);
  }
}

void AlignReference(const AlignArgs& a) {
  Require(a.experts >= 1 && a.experts <= kMaxExperts, "align", "experts out of range");
  Require(a.slots >= 0 && a.slots < (int64_t{1} << 31), "align", "slot count out of range");
  for (int e = 0; e < a.experts; ++e) a.counts[e] = 0;
  for (int64_t s = 0; s < a.slots; ++s) {
    const int32_t e = a.indices[s];
    Require(e >= 0 && e < a.experts, "align", "expert index " + std::to_string(e) + " out of range");
    ++a.counts[e];
  }
  a.offsets[0] = 0;
  for (int e = 0; e < a.experts; ++e) a.offsets[e + 1] = a.offsets[e] + a.counts[e];
  std::vector<int32_t> next(a.offsets, a.offsets + a.experts);
  for (int64_t s = 0; s < a.slots; ++s) {
    const int32_t p = next[a.indices[s]]++;
    a.sorted_slot[p] = static_cast<int32_t>(s);
    a.slot_position[s] = p;
  }
}

void GatherReference(const GatherArgs& a) {
  Require(a.top_k >= 1, "gather", "top_k must be at least 1");
  const size_t row_bytes = static_cast<size_t>(a.hidden) * DTypeSize(a.dtype);
  for (int64_t p = 0; p < a.slots; ++p) {
    const int64_t n = a.sorted_slot[p] / a.top_k;
    std::memcpy(static_cast<char*>(a.rows) + p * row_bytes, static_cast<const char*>(a.x) + n * row_bytes, row_bytes);
  }
}

void GatherBackwardReference(const GatherBackwardArgs& a) {
  Require(a.top_k >= 1, "gather backward", "top_k must be at least 1");
  const int64_t h_count = a.hidden;
  std::vector<float> acc(h_count);
  for (int64_t n = 0; n < a.tokens; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int j = 0; j < a.top_k; ++j) {
      const int64_t p = a.slot_position[n * a.top_k + j];
      for (int64_t h = 0; h < h_count; ++h) acc[h] += Load(a.grad_rows, p * h_count + h, a.dtype);
    }
    for (int64_t h = 0; h < h_count; ++h) Store(a.grad_x, n * h_count + h, acc[h], a.dtype);
  }
}

void CombineReference(const CombineArgs& a) {
  Require(a.top_k >= 1, "combine", "top_k must be at least 1");
  const int64_t h_count = a.hidden;
  std::vector<float> acc(h_count);
  for (int64_t n = 0; n < a.tokens; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int j = 0; j < a.top_k; ++j) {
      const int64_t s = n * a.top_k + j, p = a.slot_position[s];
      const float w = a.weights[s];
      for (int64_t h = 0; h < h_count; ++h) acc[h] += w * Load(a.rows, p * h_count + h, a.dtype);
    }
    for (int64_t h = 0; h < h_count; ++h) Store(a.out, n * h_count + h, acc[h], a.dtype);
  }
}

void CombineBackwardReference(const CombineBackwardArgs& a) {
  Require(a.top_k >= 1, "combine backward", "top_k must be at least 1");
  const int64_t h_count = a.hidden;
  for (int64_t p = 0; p < a.slots; ++p) {
    const int64_t s = a.sorted_slot[p], n = s / a.top_k;
    const float w = a.weights[s];
    float dot = 0;
    for (int64_t h = 0; h < h_count; ++h) {
      const float go = Load(a.grad_out, n * h_count + h, a.dtype);
      Store(a.grad_rows, p * h_count + h, w * go, a.dtype);
      dot += go * Load(a.rows, p * h_count + h, a.dtype);
    }
    a.grad_weights[s] = dot;
  }
}

void SwiGluReference(const SwiGluArgs& a) {
  for (int64_t i = 0; i < a.count; ++i) {
    const float g = Load(a.gate, i, a.dtype), u = Load(a.up, i, a.dtype);
    const float s = 1.0f / (1.0f + std::exp(-g));
    Store(a.out, i, g * s * u, a.dtype);
  }
}

void SwiGluBackwardReference(const SwiGluBackwardArgs& a) {
  for (int64_t i = 0; i < a.count; ++i) {
    const float go = Load(a.grad_out, i, a.dtype), g = Load(a.gate, i, a.dtype), u = Load(a.up, i, a.dtype);
    const float s = 1.0f / (1.0f + std::exp(-g));
    Store(a.grad_gate, i, go * u * s * (1.0f + g * (1.0f - s)), a.dtype);
    Store(a.grad_up, i, go * g * s, a.dtype);
  }
}

}  // namespace flexfed::kernels
