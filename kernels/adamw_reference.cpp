// AdamW's update, the CPU's pass and the CUDA kernel's reference: one loop over the buffers, in the
// order kernels/adamw_ops.h gives, compiled per x86 level so that it vectorises (sqrt included:
// this file is built with -fno-math-errno).
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/adamw_ops.h"
#include "kernels/cpu_clones.h"

namespace flexfed::kernels {
namespace {

template <typename Moment>
inline float LoadMoment(const Moment* m, int64_t i);
template <>
inline float LoadMoment<float>(const float* m, int64_t i) { return m[i]; }
template <>
inline float LoadMoment<uint16_t>(const uint16_t* m, int64_t i) { return Bf16ToFloat(m[i]); }

inline void StoreMoment(float* m, int64_t i, float v) { m[i] = v; }
inline void StoreMoment(uint16_t* m, int64_t i, float v) { m[i] = FloatToBf16(v); }

// The scalars are read into locals first: a store through `p` could otherwise alias the argument
// struct, and the compiler would keep the loop scalar.
template <typename Moment>
inline void Update(const AdamWArgs& a, Moment* __restrict__ m, Moment* __restrict__ v) {
  float* __restrict__ p = a.param;
  const float* __restrict__ g = a.grad;
  const int64_t count = a.count;
  const float b1 = a.beta1, b2 = a.beta2, c1 = a.c1, c2 = a.c2, eps = a.eps;
  const float decay = a.decay, step_size = a.step_size, bias2_sqrt = a.bias2_sqrt;
  for (int64_t i = 0; i < count; ++i) {
    const float gi = g[i];
    const float mi = LoadMoment(m, i) * b1 + gi * c1;
    const float vi = LoadMoment(v, i) * b2 + gi * gi * c2;
    const float pi = p[i] * decay;  // exact when there is no decay (× 1)
    p[i] = pi - step_size * mi / (std::sqrt(vi) / bias2_sqrt + eps);
    StoreMoment(m, i, mi);
    StoreMoment(v, i, vi);
  }
}

FLEXFED_CPU_CLONES void UpdateF32(const AdamWArgs& a) {
  Update(a, static_cast<float*>(a.exp_avg), static_cast<float*>(a.exp_avg_sq));
}

FLEXFED_CPU_CLONES void UpdateBf16(const AdamWArgs& a) {
  Update(a, static_cast<uint16_t*>(a.exp_avg), static_cast<uint16_t*>(a.exp_avg_sq));
}

}  // namespace

AdamWArgs AdamWStepScalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  if (step < 1) throw std::invalid_argument("adamw: the step count starts at 1, got " + std::to_string(step));
  AdamWArgs a;
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.c1 = static_cast<float>(1.0 - beta1);
  a.c2 = static_cast<float>(1.0 - beta2);
  a.eps = static_cast<float>(eps);
  a.decay = static_cast<float>(1.0 - lr * weight_decay);
  a.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  a.bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  return a;
}

void AdamWReference(const AdamWArgs& a) {
  if (a.count < 0) throw std::invalid_argument("adamw: negative element count");
  if (a.count == 0) return;
  if (a.moments == DType::kF32) {
    UpdateF32(a);
  } else {
    UpdateBf16(a);
  }
}

}  // namespace flexfed::kernels
