#include "common/model/layers.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu_clones.h"

namespace flexfed {
namespace {

// One pass per row, fp32 arithmetic as in RmsNorm(): y = (w · (x · rsqrt(mean(x²) + eps))) cast
// to x's dtype. Only the sum of squares is accumulated differently (in double, sequentially).
template <typename T, typename W>
void RmsNormRows(const T* x, const W* w, T* y, int64_t rows, int64_t width, double eps) {
  at::parallel_for(0, rows, /*grain_size=*/std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * width;
      T* yr = y + r * width;
      double sum = 0;
      for (int64_t i = 0; i < width; ++i) {
        const float v = static_cast<float>(xr[i]);
        sum += static_cast<double>(v) * v;
      }
      const float inv = 1.0f / std::sqrt(static_cast<float>(sum / width) + static_cast<float>(eps));
      for (int64_t i = 0; i < width; ++i) {
        yr[i] = static_cast<T>(static_cast<float>(w[i]) * (static_cast<float>(xr[i]) * inv));
      }
    }
  });
}

// The fused path serves inference on CPU (no graph to record); everything else takes ATen ops.
bool UseFusedCpu(const at::Tensor& x, const at::Tensor& weight) {
  return !at::GradMode::is_enabled() && x.is_cpu() && weight.is_cpu() && weight.is_contiguous() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
         (weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type());
}

// The fused training passes (SiluMul, RmsNorm): GCC vector types of 8 floats (one AVX register,
// two SSE ones), each pass compiled for x86-64-v4 (AVX-512), v3 (AVX2, FMA) and baseline x86-64,
// the one the CPU supports picked when the program loads (FLEXFED_CPU_CLONES).

// The helpers below take and return these vectors: always inlined into each clone, so the calling
// convention GCC warns about (-Wpsabi, reported at the end of the file) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"
#define FLEXFED_INLINE inline __attribute__((always_inline))

constexpr int64_t kLanes = 8;
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

FLEXFED_INLINE Floats Load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FLEXFED_INLINE void Store(float* p, Floats v) { std::memcpy(p, &v, sizeof v); }
FLEXFED_INLINE Floats Splat(float f) { return Floats{} + f; }

// Lanewise min and max (NaN stays NaN: the comparison is false, x kept).
FLEXFED_INLINE Floats Select(Ints take_a, Floats a, Floats b) { return (Floats)(((Ints)a & take_a) | ((Ints)b & ~take_a)); }
FLEXFED_INLINE Floats Max(Floats x, Floats low) { return Select(x < low, low, x); }
FLEXFED_INLINE Floats Min(Floats x, Floats high) { return Select(x > high, high, x); }

// exp(x), the single-precision Cephes method: x = n·ln2 + r with |r| ≤ ln2/2 (ln2 in two parts),
// exp(r) by a polynomial, 2ⁿ built in the exponent bits; within 2 ulp of the exact value.
// x is clamped to [-87.3, 88] (exp stays a normal float); NaN stays NaN.
FLEXFED_INLINE Floats Exp(Floats x) {
  x = Min(Max(x, Splat(-87.3f)), Splat(88.0f));
  const Floats shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5·2²³: rounds n to nearest
  const Floats n = shifted - 12582912.0f;
  const Floats r = x - n * 0.693359375f - n * -2.12194440e-4f;
  Floats p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const Ints exponent = ((Ints)shifted - 0x4B400000 + 127) << 23;  // n + bias, in the exponent field
  return p * (Floats)exponent;
}

// h = s·b with s = a / (1 + exp(-a)) = silu(a), kLanes at a time.
FLEXFED_INLINE Floats SiluMulLanes(Floats a, Floats b) { return a / (1.0f + Exp(-a)) * b; }

// With σ = 1 / (1 + exp(-a)): db = dh·s, da = dh·b·σ·(1 + a·(1 - σ)) (silu's derivative).
FLEXFED_INLINE void SiluMulBackwardLanes(Floats a, Floats b, Floats dh, Floats* da, Floats* db) {
  const Floats e = 1.0f + Exp(-a), sigma = 1.0f / e;
  *db = dh * (a / e);
  *da = dh * b * (sigma * (1.0f + a * (1.0f - sigma)));
}

// The spans: whole vectors, then the tail through a zero-padded vector (the same arithmetic).
FLEXFED_CPU_CLONES void SiluMulSpan(const float* a, const float* b, float* h, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) Store(h + i, SiluMulLanes(Load(a + i), Load(b + i)));
  if (i == n) return;
  float ta[kLanes] = {}, tb[kLanes] = {}, th[kLanes];
  std::copy(a + i, a + n, ta);
  std::copy(b + i, b + n, tb);
  Store(th, SiluMulLanes(Load(ta), Load(tb)));
  std::copy(th, th + (n - i), h + i);
}

FLEXFED_CPU_CLONES void SiluMulBackwardSpan(const float* a, const float* b, const float* dh, float* da, float* db,
                                            int64_t n) {
  int64_t i = 0;
  Floats va, vb;
  for (; i + kLanes <= n; i += kLanes) {
    SiluMulBackwardLanes(Load(a + i), Load(b + i), Load(dh + i), &va, &vb);
    Store(da + i, va);
    Store(db + i, vb);
  }
  if (i == n) return;
  float ta[kLanes] = {}, tb[kLanes] = {}, tg[kLanes] = {}, out_a[kLanes], out_b[kLanes];
  std::copy(a + i, a + n, ta);
  std::copy(b + i, b + n, tb);
  std::copy(dh + i, dh + n, tg);
  SiluMulBackwardLanes(Load(ta), Load(tb), Load(tg), &va, &vb);
  Store(out_a, va);
  Store(out_b, vb);
  std::copy(out_a, out_a + (n - i), da + i);
  std::copy(out_b, out_b + (n - i), db + i);
}

constexpr int64_t kElementwiseGrain = 32768;  // ATen's grain for elementwise loops

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct SiluMulFunction : torch::autograd::Function<SiluMulFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    at::Tensor h = at::empty_like(ac);
    const float *pa = ac.data_ptr<float>(), *pb = bc.data_ptr<float>();
    float* ph = h.data_ptr<float>();
    at::parallel_for(0, ac.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      SiluMulSpan(pa + begin, pb + begin, ph + begin, end - begin);
    });
    ctx->save_for_backward({ac, bc});
    return h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor dh = grads[0].contiguous();
    at::Tensor da = at::empty_like(saved[0]), db = at::empty_like(saved[1]);
    const float *pa = saved[0].data_ptr<float>(), *pb = saved[1].data_ptr<float>(), *pg = dh.data_ptr<float>();
    float *pda = da.data_ptr<float>(), *pdb = db.data_ptr<float>();
    at::parallel_for(0, dh.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      SiluMulBackwardSpan(pa + begin, pb + begin, pg + begin, pda + begin, pdb + begin, end - begin);
    });
    return {da, db};
  }
};

// Σ of a vector's lanes.
FLEXFED_INLINE float Sum(Floats v) {
  float out = 0;
  for (int64_t i = 0; i < kLanes; ++i) out += v[i];
  return out;
}

// RMSNorm's training passes over rows of `width` (fp32): y = w · (x · r) with r = 1 / √(mean(x²) + ε),
// r kept per row; backward with g = w · dy and x̂ = x · r: dx = r · (g − x̂ · mean(g · x̂)).
FLEXFED_CPU_CLONES void RmsNormForwardRows(const float* x, const float* w, float* y, float* inv, int64_t rows,
                                           int64_t width, float eps) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * width;
    float* yr = y + row * width;
    Floats acc = {};
    int64_t i = 0;
    for (; i + kLanes <= width; i += kLanes) {
      const Floats v = Load(xr + i);
      acc += v * v;
    }
    float sum = Sum(acc);
    for (int64_t j = i; j < width; ++j) sum += xr[j] * xr[j];
    const float r = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
    inv[row] = r;
    for (i = 0; i + kLanes <= width; i += kLanes) Store(yr + i, Load(w + i) * (Load(xr + i) * r));
    for (int64_t j = i; j < width; ++j) yr[j] = w[j] * (xr[j] * r);
  }
}

FLEXFED_CPU_CLONES void RmsNormBackwardRows(const float* x, const float* w, const float* inv, const float* dy, float* dx,
                                            int64_t rows, int64_t width) {
  for (int64_t row = 0; row < rows; ++row) {
    const float *xr = x + row * width, *gr = dy + row * width;
    float* dxr = dx + row * width;
    const float r = inv[row];
    Floats acc = {};
    int64_t i = 0;
    for (; i + kLanes <= width; i += kLanes) acc += Load(w + i) * Load(gr + i) * (Load(xr + i) * r);
    float dot = Sum(acc);
    for (int64_t j = i; j < width; ++j) dot += w[j] * gr[j] * (xr[j] * r);
    const float c = dot / static_cast<float>(width);
    for (i = 0; i + kLanes <= width; i += kLanes) {
      const Floats xhat = Load(xr + i) * r;
      Store(dxr + i, r * (Load(w + i) * Load(gr + i) - xhat * c));
    }
    for (int64_t j = i; j < width; ++j) dxr[j] = r * (w[j] * gr[j] - xr[j] * r * c);
  }
}

// Rows per task: about ATen's elementwise grain of elements.
int64_t RowGrain(int64_t width) { return std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, width)); }

struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    const int64_t width = x.size(-1), rows = x.numel() / width;
    at::Tensor y = at::empty_like(xc), inv = at::empty({rows}, xc.options());
    const float *px = xc.data_ptr<float>(), *pw = wc.data_ptr<float>();
    float *py = y.data_ptr<float>(), *pi = inv.data_ptr<float>();
    at::parallel_for(0, rows, RowGrain(width), [&](int64_t begin, int64_t end) {
      RmsNormForwardRows(px + begin * width, pw, py + begin * width, pi + begin, end - begin, width, static_cast<float>(eps));
    });
    ctx->save_for_backward({xc, wc, inv});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &inv = saved[2];
    const at::Tensor dy = grads[0].contiguous();
    const int64_t width = x.size(-1), rows = x.numel() / width;
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) {
      dx = at::empty_like(x);
      const float *px = x.data_ptr<float>(), *pw = weight.data_ptr<float>(), *pi = inv.data_ptr<float>();
      const float* pg = dy.data_ptr<float>();
      float* pdx = dx.data_ptr<float>();
      at::parallel_for(0, rows, RowGrain(width), [&](int64_t begin, int64_t end) {
        RmsNormBackwardRows(px + begin * width, pw, pi + begin, pg + begin * width, pdx + begin * width, end - begin, width);
      });
    }
    at::Tensor dw;  // a trained norm (pretraining): Σ over rows of dy · x̂
    if (ctx->needs_input_grad(1)) dw = (dy.view({rows, width}) * (x.view({rows, width}) * inv.unsqueeze(1))).sum(0);
    return {dx, dw, at::Tensor()};
  }
};

}  // namespace

at::Tensor SiluMul(const at::Tensor& a, const at::Tensor& b) {
  if (at::GradMode::is_enabled() && a.is_cpu() && b.is_cpu() && a.scalar_type() == at::kFloat &&
      b.scalar_type() == at::kFloat && a.sizes() == b.sizes()) {
    return SiluMulFunction::apply(a, b);
  }
  return at::silu(a) * b;
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (at::GradMode::is_enabled() && x.is_cpu() && weight.is_cpu() && x.scalar_type() == at::kFloat &&
      weight.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == weight.numel() && x.numel() > 0) {
    return RmsNormFunction::apply(x, weight, eps);
  }
  if (UseFusedCpu(x, weight)) {
    at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    const int64_t width = x.size(-1), rows = width == 0 ? 0 : x.numel() / width;
    if (x.scalar_type() == at::kFloat) {
      RmsNormRows(xc.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, width, eps);
    } else if (weight.scalar_type() == at::kFloat) {
      RmsNormRows(xc.data_ptr<at::BFloat16>(), weight.data_ptr<float>(), y.data_ptr<at::BFloat16>(), rows, width, eps);
    } else {
      RmsNormRows(xc.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), rows, width, eps);
    }
    return y;
  }
  if (x.is_cuda() && weight.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == weight.numel()) {
    return RmsNormFp32Fused(x, weight, eps);
  }
  return RmsNormReference(x, weight, eps);
}

at::Tensor RmsNormFp32Fused(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "RmsNormFp32Fused: the weight must be fp32, got ", weight.scalar_type());
  const at::Tensor y = std::get<0>(at::_fused_rms_norm(x.to(at::kFloat), {x.size(-1)}, weight, eps));
  return y.to(x.scalar_type());
}

at::Tensor RmsNormReference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor normed = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (weight * normed).to(x.scalar_type());
}

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

RopeTables MakeRopeTables(double theta, int64_t head_dim, int64_t positions) {
  at::Tensor exponents = at::arange(0, head_dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(head_dim);
  at::Tensor inv_freq = 1.0 / at::pow(theta, exponents);
  at::Tensor pos = at::arange(positions, at::kLong).to(at::kFloat);
  at::Tensor freqs = at::outer(pos, inv_freq);  // [P, D/2]: one fp32 product per entry, as HF's matmul
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos(), emb.sin()};
}

at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return (x * cos + RotateHalf(x) * sin).to(x.scalar_type());
}

at::Tensor RepeatKv(const at::Tensor& x, int64_t groups) {
  if (groups == 1) return x;
  const int64_t b = x.size(0), g = x.size(1), s = x.size(2), d = x.size(3);
  return x.unsqueeze(2).expand({b, g, groups, s, d}).reshape({b, g * groups, s, d});
}

at::Tensor CausalAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t past, double scale) {
  const int64_t t = q.size(-2);
  TORCH_CHECK(k.size(-2) == past + t && v.size(-2) == past + t, "CausalAttention: ", k.size(-2), " keys for ", past,
              " past and ", t, " new positions");
  // One new position sees every key; a fresh sequence is plain causal (top-left aligned, the fused
  // kernels' own mask); new positions after a cache need the mask shifted by `past`.
  if (t == 1) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/false, scale);
  if (past == 0) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, scale);
  const at::Tensor visible = at::ones({t, past + t}, q.options().dtype(at::kBool)).tril(past);
  return at::scaled_dot_product_attention(q, k, v, visible, 0.0, /*is_causal=*/false, scale);
}

at::Tensor SwiGlu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down) {
  return at::linear(SiluMul(at::linear(x, gate), at::linear(x, up)), down);
}

}  // namespace flexfed
