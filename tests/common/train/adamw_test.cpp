// Specification of the optimizer (common/train/adamw.h).
#include <catch2/catch.hpp>

#include <cmath>
#include <tuple>

#include "common/train/adamw.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::RelativeError;

// torch.optim.AdamW's update, written out in double for one parameter vector.
struct DoubleAdamW {
  std::vector<double> p, m, v;
  void Step(const std::vector<double>& g, double lr, const AdamWOptions& o, int t) {
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1 - lr * o.weight_decay;
      m[i] = o.beta1 * m[i] + (1 - o.beta1) * g[i];
      v[i] = o.beta2 * v[i] + (1 - o.beta2) * g[i] * g[i];
      const double mhat = m[i] / (1 - std::pow(o.beta1, t));
      const double denom = std::sqrt(v[i]) / std::sqrt(1 - std::pow(o.beta2, t)) + o.eps;
      p[i] -= lr * mhat / denom;
    }
  }
};

TEST_CASE("AdamW follows torch.optim.AdamW's update", "[training]") {
  const AdamWOptions o{0.9, 0.95, 1e-8, 0.1};
  {
    at::Tensor p = at::randn({1000}).requires_grad_(true);
    DoubleAdamW want;
    for (int64_t i = 0; i < 1000; ++i) want.p.push_back(p[i].item<float>());
    want.m.assign(1000, 0.0);
    want.v.assign(1000, 0.0);
    AdamW opt({{"p", p}}, o);
    for (int t = 1; t <= 5; ++t) {
      at::Tensor g = at::randn({1000});
      p.mutable_grad() = g.clone();
      std::vector<double> gd(g.data_ptr<float>(), g.data_ptr<float>() + 1000);
      opt.Step(1e-2 * t);
      want.Step(gd, 1e-2 * t, o, t);
      opt.ZeroGrad();
      CHECK_FALSE(p.grad().defined());
    }
    at::Tensor expected = at::tensor(want.p, at::kDouble);
    CHECK(RelativeError(p.detach(), expected) < 1e-5);
  }
}

TEST_CASE("AdamW with bf16 moments: one pass, the fp32 update rounded as the ATen composition rounds it", "[training]") {
  at::manual_seed(31);
  const AdamWOptions o{0.9, 0.95, 1e-8, 0.1, at::kBFloat16};
  // Sizes across the vector width and ATen's parallel grain (the pass runs in chunks on threads).
  for (int64_t n : {int64_t{7}, int64_t{1000}, int64_t{100003}}) {
    INFO(n << " elements");
    at::Tensor p = at::randn({n}).requires_grad_(true);
    AdamW opt({{"p", p}}, o);
    for (int t = 1; t <= 6; ++t) {
      INFO("step " << t);
      // Each step from the optimizer's own state: the composition the pass replaces (moments
      // widened, the fp32 update, rounded back) against the pass.
      at::Tensor p32 = p.detach().clone();
      at::Tensor mf = opt.exp_avg(0).to(at::kFloat), vf = opt.exp_avg_sq(0).to(at::kFloat);
      const at::Tensor m_prev = mf.clone(), v_prev = vf.clone();
      const at::Tensor g = 0.01 * at::randn({n});
      p.mutable_grad() = g.clone();
      opt.Step(1e-3 * t);
      AdamWUpdate(p32, g, mf, vf, 1e-3 * t, o, t);
      CHECK(opt.exp_avg(0).scalar_type() == at::kBFloat16);
      CHECK(RelativeError(p.detach(), p32) < 1e-6);
      // The moments: the same bf16 values, but where the fp32 value fell near a rounding boundary (a
      // fused multiply-add rounds once where the composition rounds twice): an ulp of bf16, plus
      // fp32's rounding of the two terms where they cancel (m near zero).
      const at::Tensor m_terms = o.beta1 * m_prev.abs() + (1 - o.beta1) * g.abs();
      const at::Tensor v_terms = o.beta2 * v_prev.abs() + (1 - o.beta2) * g * g;
      for (auto [got, want, terms] : {std::tuple{opt.exp_avg(0), mf.to(at::kBFloat16), m_terms},
                                      {opt.exp_avg_sq(0), vf.to(at::kBFloat16), v_terms}}) {
        const at::Tensor bound = want.to(at::kFloat).abs() * (1.0 / 128) + terms * 2.5e-7;
        CHECK(((got.to(at::kFloat) - want.to(at::kFloat)).abs() <= bound).all().item<bool>());
        CHECK(at::ne(got, want).sum().item<int64_t>() <= std::max<int64_t>(1, n / 1000));
      }
    }
  }
  {  // a non-contiguous parameter takes the composition, with the same result
    at::Tensor base = at::randn({40, 30});
    at::Tensor strided = base.t().contiguous().t().requires_grad_(true);  // column-major storage
    at::Tensor dense = base.clone().requires_grad_(true);
    REQUIRE_FALSE(strided.is_contiguous());
    AdamW a({{"p", strided}}, o), b({{"p", dense}}, o);
    const at::Tensor g = at::randn({40, 30});
    strided.mutable_grad() = g.clone();
    dense.mutable_grad() = g.clone();
    a.Step(1e-2);
    b.Step(1e-2);
    CHECK(RelativeError(strided.detach(), dense.detach()) < 1e-6);
  }
}

TEST_CASE("AdamW state survives State/LoadState and continues identically", "[training]") {
  at::Tensor a = at::randn({50}).requires_grad_(true), b = at::randn({50}).requires_grad_(true);
  at::Tensor a2 = a.detach().clone().requires_grad_(true);
  AdamW one({{"a", a}}, {}), two({{"a", a2}}, {});
  std::vector<at::Tensor> grads = {at::randn({50}), at::randn({50}), at::randn({50})};
  a.mutable_grad() = grads[0].clone();
  one.Step(0.1);
  a2.mutable_grad() = grads[0].clone();
  two.Step(0.1);
  AdamW restored({{"a", a2}}, {});
  REQUIRE(restored.LoadState(two.State()).ok());
  CHECK(restored.steps() == 1);
  for (int i = 1; i < 3; ++i) {
    a.mutable_grad() = grads[i].clone();
    one.Step(0.1);
    a2.mutable_grad() = grads[i].clone();
    restored.Step(0.1);
  }
  CHECK(at::equal(a, a2));
  AdamW other({{"b", b}}, {});
  CHECK_FALSE(other.LoadState(one.State()).ok());  // another parameter's state is refused
}

TEST_CASE("gradient clipping scales the global norm down to the limit", "[training]") {
  at::Tensor a = at::zeros({2}).requires_grad_(true), b = at::zeros({1}).requires_grad_(true);
  a.mutable_grad() = at::tensor({3.0f, 0.0f});
  b.mutable_grad() = at::tensor({4.0f});
  const double norm = ClipGradNorm({{"a", a}, {"b", b}}, 1.0);
  CHECK(norm == Approx(5.0));
  CHECK(a.grad()[0].item<float>() == Approx(0.6).epsilon(1e-5));
  CHECK(b.grad()[0].item<float>() == Approx(0.8).epsilon(1e-5));
  CHECK(ClipGradNorm({{"a", a}, {"b", b}}, 10.0) == Approx(1.0).epsilon(1e-5));  // under the limit: untouched
  CHECK(b.grad()[0].item<float>() == Approx(0.8).epsilon(1e-5));
}

}  // namespace
}  // namespace flexfed
