#include "common/model/layers.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>
#include <vector>

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

}  // namespace

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
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
  return RmsNormReference(x, weight, eps);
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
  return at::linear(at::silu(at::linear(x, gate)) * at::linear(x, up), down);
}

}  // namespace flexfed
