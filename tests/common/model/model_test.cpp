// Specification of the FlexOlmo model (common/model/model.h, common/model/layers.h, common/model/moe.h) against
// Hugging Face transformers (tests/oracle/hf_model_cases.py) and its own invariants.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <filesystem>
#include <limits>

#include "common/model/checkpoint.h"
#include "common/core/file_util.h"
#include "common/model/layers.h"
#include "common/model/model.h"
#include "tests/oracle/oracle.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::kOracleCases;
using testing::OracleCase;
using testing::OracleCaseDir;
using testing::OracleExpected;
using testing::RelativeError;
using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

at::Tensor Get(const std::shared_ptr<const SafetensorsFile>& f, const std::string& name) {
  return ValueOrDie(f->Get(name));
}

TEST_CASE("logits, layer inputs, router logits and opt-out match Hugging Face transformers", "[model][oracle]") {
  at::NoGradGuard no_grad;
  for (const OracleCase& c : kOracleCases) {
    INFO(c.name);
    FlexOlmoModel model = ValueOrDie(FlexOlmoModel::Load(OracleCaseDir(c.name)));
    auto expected = OracleExpected(c.name);
    ForwardTrace trace;
    trace.want_layer_inputs = true;
    at::Tensor logits = model.Forward(Get(expected, "ids"), Routing::All(), nullptr, &trace);
    CHECK(logits.scalar_type() == Get(expected, "logits").scalar_type());
    CHECK(RelativeError(logits, Get(expected, "logits")) < c.tolerance);
    for (size_t l = 0; l < trace.layer_inputs.size(); ++l) {
      CHECK(RelativeError(trace.layer_inputs[l], Get(expected, "layer_input." + std::to_string(l))) < c.tolerance);
    }
    if (model.config().is_moe()) {
      REQUIRE(trace.router_logits.size() == static_cast<size_t>(model.config().num_hidden_layers));
      for (size_t l = 0; l < trace.router_logits.size(); ++l) {
        CHECK(RelativeError(trace.router_logits[l], Get(expected, "router_logits." + std::to_string(l))) < c.tolerance);
      }
    }
    if (expected->Contains("logits_excluding_1")) {
      at::Tensor excluded = model.Forward(Get(expected, "ids"), Routing::Excluding(model.config().num_experts, {1}));
      CHECK(RelativeError(excluded, Get(expected, "logits_excluding_1")) < c.tolerance);
      CHECK(RelativeError(excluded, logits) > 1e-3);  // excluding an expert really changes the output
    }
  }
}

TEST_CASE("RMSNorm, RoPE and SwiGLU match transformers' modules", "[model][oracle]") {
  for (const OracleCase& c : kOracleCases) {
    INFO(c.name);
    auto e = OracleExpected(c.name);
    FlexOlmoModel model = ValueOrDie(FlexOlmoModel::Load(OracleCaseDir(c.name)));
    const double tol = c.tolerance;
    CHECK(RelativeError(RmsNorm(Get(e, "block.rms.x"), Get(e, "block.rms.w"), 1e-5), Get(e, "block.rms.y")) < tol);

    RopeTables rope = MakeRopeTables(10000.0, 8, 6);
    CHECK(RelativeError(rope.cos, Get(e, "block.rope.cos")) < 1e-6);
    CHECK(RelativeError(rope.sin, Get(e, "block.rope.sin")) < 1e-6);
    at::Tensor y = ApplyRope(Get(e, "block.rope.x"), rope.cos, rope.sin);
    CHECK(y.scalar_type() == Get(e, "block.rope.x").scalar_type());
    CHECK(RelativeError(y, Get(e, "block.rope.y")) < tol);

    const ExpertWeights& ex = model.layers()[0].experts[0];
    CHECK(RelativeError(SwiGlu(Get(e, "block.swiglu.x"), ex.gate_proj, ex.up_proj, ex.down_proj),
                        Get(e, "block.swiglu.y")) < tol);
  }
}

TEST_CASE("bf16 RMSNorm multiplies the weight in fp32 and rounds once", "[model]") {
  at::Tensor x = at::randn({64, 256}).to(at::kBFloat16), w = (1 + at::randn({256})).to(at::kBFloat16);
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor once = (w.to(at::kFloat) * (x32 * at::rsqrt(x32.pow(2).mean(-1, true) + 1e-6))).to(at::kBFloat16);
  at::Tensor twice = w * (x32 * at::rsqrt(x32.pow(2).mean(-1, true) + 1e-6)).to(at::kBFloat16);
  CHECK(at::equal(RmsNormReference(x, w, 1e-6), once));
  CHECK_FALSE(at::equal(RmsNormReference(x, w, 1e-6), twice));  // the distinction is observable
}

TEST_CASE("the fused inference RMSNorm equals the ATen reference", "[model]") {
  at::NoGradGuard no_grad;  // the fused path serves gradient-free calls only
  for (auto [x_type, w_type] : {std::pair{at::kFloat, at::kFloat}, {at::kBFloat16, at::kBFloat16}, {at::kBFloat16, at::kFloat}}) {
    INFO(c10::toString(x_type) << " x, " << c10::toString(w_type) << " weight");
    at::Tensor x = (3 * at::randn({3, 7, 200}) + 0.5).to(x_type), w = (1 + at::randn({200})).to(w_type);
    at::Tensor fused = RmsNorm(x, w, 1e-6), reference = RmsNormReference(x, w, 1e-6);
    CHECK(fused.scalar_type() == reference.scalar_type());
    // fp32: the sum of squares is accumulated in another order; bf16: at most one ulp apart.
    CHECK(RelativeError(fused, reference) < (x_type == at::kFloat ? 1e-6 : 8e-3));
    // Non-contiguous input (a transposed view) gives the same values.
    at::Tensor xt = x.transpose(0, 1);
    CHECK(at::equal(RmsNorm(xt, w, 1e-6), RmsNorm(xt.contiguous(), w, 1e-6)));
  }
}

TEST_CASE("the fused training RMSNorm equals the ATen reference, values and gradients", "[model]") {
  at::manual_seed(22);
  at::AutoGradMode grad(true);
  // Widths around the vector width (tails), a model's; rows across the thread grain; a trained
  // weight (pretraining) and a frozen one (an owner's anchor norms).
  for (int64_t width : {7, 8, 200, 512}) {
    for (bool trained_weight : {false, true}) {
      INFO("width " << width << (trained_weight ? ", trained weight" : ", frozen weight"));
      at::Tensor x = (3 * at::randn({3, 70, width}) + 0.5).requires_grad_();
      at::Tensor w = (1 + at::randn({width})).requires_grad_(trained_weight);
      const at::Tensor probe = at::randn({3, 70, width});
      std::vector<at::Tensor> leaves = {x};
      if (trained_weight) leaves.push_back(w);
      const at::Tensor y = RmsNorm(x, w, 1e-6), want = RmsNormReference(x, w, 1e-6);
      REQUIRE(y.requires_grad());
      const auto got_grads = torch::autograd::grad({(y * probe).sum()}, leaves);
      const auto want_grads = torch::autograd::grad({(want * probe).sum()}, leaves);
      CHECK(at::allclose(y, want, /*rtol=*/2e-6, /*atol=*/1e-6));
      CHECK(at::allclose(got_grads[0], want_grads[0], /*rtol=*/1e-5, /*atol=*/1e-5));
      if (trained_weight) CHECK(RelativeError(got_grads[1], want_grads[1]) < 1e-5);
    }
  }
  // bf16 input: the reference composition itself.
  at::Tensor xb = at::randn({4, 16}).to(at::kBFloat16).requires_grad_(), w = at::ones({16});
  CHECK(at::equal(RmsNorm(xb, w, 1e-6), RmsNormReference(xb, w, 1e-6)));
}

// The GPU's RMSNorm (ATen's fused one on the fp32 cast) against the reference: here on the CPU, where
// ATen composes it, and on a GPU its kernels (the [gpu] case below).
void CheckFp32FusedRmsNorm(const at::Device& device, bool through_rms_norm) {
  at::manual_seed(23);
  at::AutoGradMode grad(true);
  for (at::ScalarType x_type : {at::kFloat, at::kBFloat16}) {
    for (bool trained_weight : {false, true}) {
      INFO(c10::toString(x_type) << " x" << (trained_weight ? ", trained weight" : ", frozen weight") << " on " << device);
      const at::Tensor x = (3 * at::randn({3, 70, 512}) + 0.5).to(device, x_type).requires_grad_();
      const at::Tensor w = (1 + at::randn({512})).to(device).requires_grad_(trained_weight);
      const at::Tensor probe = at::randn({3, 70, 512}).to(device, x_type);
      std::vector<at::Tensor> leaves = {x};
      if (trained_weight) leaves.push_back(w);
      const at::Tensor y = through_rms_norm ? RmsNorm(x, w, 1e-6) : RmsNormFp32Fused(x, w, 1e-6);
      const at::Tensor want = RmsNormReference(x, w, 1e-6);
      REQUIRE(y.scalar_type() == x_type);
      const auto got_grads = torch::autograd::grad({(y.to(at::kFloat) * probe.to(at::kFloat)).sum()}, leaves);
      const auto want_grads = torch::autograd::grad({(want.to(at::kFloat) * probe.to(at::kFloat)).sum()}, leaves);
      // fp32: the sum of squares in another order; bf16: the same fp32 values rounded once (an ulp at most).
      const double tol = x_type == at::kFloat ? 1e-5 : 8e-3;
      CHECK(RelativeError(y.to(at::kFloat), want.to(at::kFloat)) < tol);
      CHECK(got_grads[0].scalar_type() == x_type);
      CHECK(RelativeError(got_grads[0].to(at::kFloat), want_grads[0].to(at::kFloat)) < tol);
      if (trained_weight) CHECK(RelativeError(got_grads[1], want_grads[1]) < (x_type == at::kFloat ? 1e-5 : 1e-3));
    }
  }
}

TEST_CASE("the GPU's RMSNorm (ATen's fused, in fp32) equals the reference, values and gradients", "[model]") {
  CheckFp32FusedRmsNorm(at::kCPU, /*through_rms_norm=*/false);
}

TEST_CASE("on a GPU RMSNorm runs ATen's fused kernels and equals the reference", "[gpu]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA device: this [gpu] test is skipped (docs/GPU.md)");
    return;
  }
  CheckFp32FusedRmsNorm(at::Device(at::kCUDA, 0), /*through_rms_norm=*/true);
}

TEST_CASE("the fused training silu(a)·b equals ATen's, values and gradients, at any length", "[model]") {
  at::manual_seed(21);
  // Lengths around the vector width and the thread grain; values out to where exp leaves float's range.
  for (int64_t n : {1, 7, 8, 9, 100, 32768 * 2 + 5}) {
    INFO(n << " elements");
    at::Tensor a = (4 * at::randn({n})).requires_grad_(), b = at::randn({n}).requires_grad_();
    if (n > 8) {
      at::NoGradGuard no_grad;
      a[0] = 90.0;
      a[1] = -90.0;
      a[2] = 0.0;
      a[3] = -30.0;
    }
    const at::Tensor probe = at::randn({n});
    at::Tensor h = SiluMul(a, b);
    REQUIRE(h.requires_grad());
    const torch::autograd::variable_list got = torch::autograd::grad({(h * probe).sum()}, {a, b});
    at::Tensor reference = at::silu(a) * b;
    const torch::autograd::variable_list want = torch::autograd::grad({(reference * probe).sum()}, {a, b});
    // Elementwise within a few ulp of ATen's (its exp is another polynomial), not just on average;
    // an absolute floor where silu's derivative crosses zero (a ≈ -1.28) and far out where both are ~0.
    auto close = [](const at::Tensor& x, const at::Tensor& y) { return at::allclose(x, y, /*rtol=*/2e-6, /*atol=*/1e-6); };
    CHECK(close(h.detach(), reference.detach()));
    CHECK(close(got[0], want[0]));
    CHECK(close(got[1], want[1]));
  }
  // NaN in, NaN out; without gradients the ATen ops themselves (HF's inference numbers, bit for bit).
  at::Tensor a = at::randn({20}), b = at::randn({20});
  a[5] = std::numeric_limits<float>::quiet_NaN();
  {
    at::AutoGradMode grad(true);
    CHECK(std::isnan(SiluMul(a, b)[5].item<float>()));
  }
  at::NoGradGuard no_grad;
  CHECK(at::equal(SiluMul(a.nan_to_num(), b), at::silu(a.nan_to_num()) * b));
}

TEST_CASE("causal attention equals full masked attention, values and gradients", "[model]") {
  at::AutoGradMode grad_on(true);
  const int64_t b = 2, heads = 3, d = 8;
  for (int64_t past : {0, 5}) {
    for (int64_t t : {1, 7, 20}) {
      INFO("past " << past << ", tokens " << t);
      at::Tensor q = at::randn({b, heads, t, d}).requires_grad_(), k = at::randn({b, heads, past + t, d}).requires_grad_(),
                 v = at::randn({b, heads, past + t, d}).requires_grad_();
      at::Tensor future = at::ones({t, past + t}, at::kBool).triu(past + 1);
      at::Tensor want = at::matmul(at::softmax((at::matmul(q, k.transpose(-1, -2)) * 0.3).masked_fill(future, -INFINITY), -1), v);
      at::Tensor got = CausalAttention(q, k, v, past, 0.3);
      CHECK(RelativeError(got, want) < 1e-5);
      at::Tensor g = at::randn(want.sizes());
      std::vector<at::Tensor> gw = torch::autograd::grad({want}, {q, k, v}, {g});
      std::vector<at::Tensor> gg = torch::autograd::grad({got}, {q, k, v}, {g});
      for (int i = 0; i < 3; ++i) CHECK(RelativeError(gg[i], gw[i]) < 1e-5);
    }
  }
  // bf16 inputs: within bf16 rounding of the fp32 result.
  at::Tensor q = at::randn({b, heads, 64, d}), k = at::randn({b, heads, 64, d}), v = at::randn({b, heads, 64, d});
  at::Tensor exact = CausalAttention(q, k, v, 0, 0.3);
  at::Tensor low = CausalAttention(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), 0, 0.3);
  CHECK(low.scalar_type() == at::kBFloat16);
  CHECK(RelativeError(low.to(at::kFloat), exact) < 2e-2);
}

TEST_CASE("hand-derived block values", "[model]") {
  // RMSNorm of (3, 4): rms = sqrt(12.5); weight (1, 2).
  at::Tensor y = RmsNorm(at::tensor({3.0f, 4.0f}), at::tensor({1.0f, 2.0f}), 0.0);
  CHECK(y[0].item<float>() == Approx(3.0 / std::sqrt(12.5)));
  CHECK(y[1].item<float>() == Approx(8.0 / std::sqrt(12.5)));
  // rotate_half([1, 2, 3, 4]) = [-3, -4, 1, 2].
  CHECK(at::equal(RotateHalf(at::tensor({1.0f, 2.0f, 3.0f, 4.0f})), at::tensor({-3.0f, -4.0f, 1.0f, 2.0f})));
  // Position 0 is the identity; position p rotates pair i by p·theta^(-2i/D).
  RopeTables rope = MakeRopeTables(100.0, 4, 3);
  CHECK(at::equal(rope.cos[0], at::ones({4})));
  CHECK(rope.cos[2][1].item<float>() == Approx(std::cos(2.0 / 10.0)));
  CHECK(rope.sin[2][3].item<float>() == Approx(std::sin(2.0 / 10.0)));
  // GQA: kv head g serves query heads g·groups .. g·groups + groups - 1.
  at::Tensor kv = at::arange(2, at::kFloat).view({1, 2, 1, 1});
  CHECK(at::equal(RepeatKv(kv, 3).flatten(), at::tensor({0.f, 0.f, 0.f, 1.f, 1.f, 1.f})));
}

TEST_CASE("routing: softmax over allowed experts, top-k, renormalisation and negative bias", "[model][moe]") {
  at::Tensor x = at::eye(3);                                    // token i picks router column i
  at::Tensor router = at::tensor({2.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f, 1.0f, 1.0f, 3.0f}).view({3, 3});  // [E, H]
  SECTION("probabilities over all experts, not renormalised") {
    RouterOutput r = Route(x, router, {}, {}, /*top_k=*/2, /*norm_topk_prob=*/false);
    // token 0 logits (2, 0, 1): softmax = e^2, 1, e / (e^2 + 1 + e).
    const double z = std::exp(2.0) + 1.0 + std::exp(1.0);
    CHECK(r.indices[0][0].item<int64_t>() == 0);
    CHECK(r.indices[0][1].item<int64_t>() == 2);
    CHECK(r.weights[0][0].item<float>() == Approx(std::exp(2.0) / z));
    CHECK(r.weights[0][1].item<float>() == Approx(std::exp(1.0) / z));
  }
  SECTION("renormalised top-k weights sum to one") {
    RouterOutput r = Route(x, router, {}, {}, 2, /*norm_topk_prob=*/true);
    CHECK(at::allclose(r.weights.sum(-1), at::ones({3})));
  }
  SECTION("an excluded expert gets probability 0 and is never chosen") {
    at::Tensor mask = at::tensor({0.0f, 0.0f, -std::numeric_limits<float>::infinity()});
    RouterOutput r = Route(x, router, {}, mask, 2, false);
    CHECK((r.indices != 2).all().item<bool>());
    // token 2 logits (0, 0, -inf): two equal experts at 1/2 each.
    CHECK(r.weights[2][0].item<float>() == Approx(0.5));
  }
  SECTION("negative bias: clamped at 0 and never applied to the public expert") {
    at::Tensor bias = at::tensor({-5.0f, 1.0f, -1.0f});
    RouterOutput r = Route(x, router, bias, {}, 1, false);
    at::Tensor plain = at::linear(x, router);
    CHECK(at::allclose(r.logits, plain + at::tensor({0.0f, 0.0f, -1.0f})));
  }
}

TEST_CASE("experts compute only the tokens routed to them", "[model][moe]") {
  const int64_t h = 8, f = 12;
  std::vector<ExpertWeights> experts;
  for (int e = 0; e < 3; ++e) experts.push_back({at::randn({f, h}), at::randn({f, h}), at::randn({h, f})});
  at::Tensor x = at::randn({5, h});
  RouterOutput route;
  route.indices = at::tensor({0, 2, 0, 0, 2}, at::kLong).view({5, 1});  // expert 1 gets no token
  route.weights = at::rand({5, 1});
  at::Tensor out = CombineExperts(x, experts, route);
  for (int64_t i = 0; i < 5; ++i) {
    const ExpertWeights& e = experts[route.indices[i][0].item<int64_t>()];
    at::Tensor want = SwiGlu(x[i].unsqueeze(0), e.gate_proj, e.up_proj, e.down_proj) * route.weights[i][0];
    CHECK(RelativeError(out[i], want[0]) < 1e-6);
  }
  // Expert 1's weights were never touched: poisoning them changes nothing.
  experts[1].gate_proj.fill_(std::numeric_limits<float>::quiet_NaN());
  CHECK(at::equal(CombineExperts(x, experts, route), out));
}

// Writes the model of `src` without expert `j` and its router row/bias entry: what a release
// built without j holds.
void WriteWithoutExpert(const std::string& src, const std::string& dst, int64_t j) {
  ModelConfig config = ValueOrDie(ReadModelConfig((fs::path(src) / "config.json").string()));
  FlexOlmoModel model = ValueOrDie(FlexOlmoModel::Load(src));
  std::vector<NamedTensor> weights, extras;
  const std::string expert_tag = ".mlp.experts.";
  for (NamedTensor& nt : model.NamedParameters()) {
    size_t at_pos = nt.name.find(expert_tag);
    if (at_pos != std::string::npos) {
      size_t num_begin = at_pos + expert_tag.size();
      size_t num_end = nt.name.find('.', num_begin);
      int64_t e = std::stoll(nt.name.substr(num_begin, num_end - num_begin));
      if (e == j) continue;
      if (e > j) nt.name = nt.name.substr(0, num_begin) + std::to_string(e - 1) + nt.name.substr(num_end);
      weights.push_back(nt);
    } else if (nt.name.find("mlp.gate.weight") != std::string::npos || nt.name.find("router_bias") != std::string::npos) {
      at::Tensor keep = at::cat({nt.tensor.narrow(0, 0, j), nt.tensor.narrow(0, j + 1, nt.tensor.size(0) - j - 1)});
      (nt.name.find("router_bias") != std::string::npos ? extras : weights).push_back({nt.name, keep});
    } else {
      weights.push_back(nt);
    }
  }
  config.num_experts -= 1;
  REQUIRE(WriteCheckpoint(dst, weights).ok());
  if (!extras.empty()) REQUIRE(WriteSafetensors((fs::path(dst) / FlexOlmoModel::kExtrasFileName).string(), extras).ok());
  REQUIRE(WriteModelConfig((fs::path(dst) / "config.json").string(), config).ok());
}

TEST_CASE("opting out expert j equals the model with expert j physically removed", "[model][optout]") {
  at::NoGradGuard no_grad;
  TempDir dir;
  ModelConfig config = ValueOrDie(ModelConfig::Preset("test", /*num_experts=*/4, /*top_k=*/2));
  FlexOlmoModel model = ValueOrDie(FlexOlmoModel::Create(config, at::kFloat, /*seed=*/7, /*with_router_bias=*/true));
  // Give the router rows and biases some spread so routing is not uniform.
  for (LayerWeights& lw : model.mutable_layers()) {
    lw.router.normal_(0.0, 1.0);
    lw.router_bias.copy_(at::tensor({0.0f, -0.5f, 0.3f, -1.5f}));
  }
  REQUIRE(model.Save(dir / "full").ok());
  at::Tensor ids = at::randint(0, config.vocab_size, {3, 17}, at::kLong);
  for (int64_t j = 1; j < 4; ++j) {
    INFO("expert " << j);
    const std::string without = dir / ("without" + std::to_string(j));
    WriteWithoutExpert(dir / "full", without, j);
    FlexOlmoModel removed = ValueOrDie(FlexOlmoModel::Load(without));
    at::Tensor opted_out = model.Forward(ids, Routing::Excluding(4, {j}));
    at::Tensor physical = removed.Forward(ids);
    // Equal up to fp32 rounding: the router's product has 4 columns here and 3 there, which BLAS
    // may sum in another order; measured 0.5–18·10⁻⁷ over runs (1e-6 failed about one run in six).
    // The full model differs from either by ~1.
    CHECK(RelativeError(opted_out, physical) <= 1e-5);
    CHECK(RelativeError(opted_out, model.Forward(ids)) > 1e-4);
  }
  // Allowing only the public expert and one other is the same as excluding the rest.
  CHECK(at::equal(model.Forward(ids, Routing::Only(4, {0, 2})), model.Forward(ids, Routing::Excluding(4, {1, 3}))));
}

TEST_CASE("KV-cache decoding gives the logits of a full forward", "[model][kvcache]") {
  at::NoGradGuard no_grad;
  for (auto [experts, top_k] : {std::pair<int64_t, int64_t>{1, 1}, {4, 2}}) {
    ModelConfig config = ValueOrDie(ModelConfig::Preset("test", experts, top_k));
    config.num_key_value_heads = 2;  // exercise GQA through the cache
    FlexOlmoModel model = ValueOrDie(FlexOlmoModel::Create(config, at::kFloat, 3));
    at::Tensor ids = at::randint(0, config.vocab_size, {2, 12}, at::kLong);
    at::Tensor full = model.Forward(ids);

    KvCache cache = model.NewCache(/*batch=*/2, /*capacity=*/16);
    std::vector<at::Tensor> pieces = {model.Forward(ids.narrow(1, 0, 5), {}, &cache)};  // prefill 5
    pieces.push_back(model.Forward(ids.narrow(1, 5, 3), {}, &cache));                  // a chunk of 3
    for (int64_t t = 8; t < 12; ++t) pieces.push_back(model.Forward(ids.narrow(1, t, 1), {}, &cache));
    CHECK(cache.length == 12);
    CHECK(RelativeError(at::cat(pieces, 1), full) < 1e-5);
  }
}

TEST_CASE("load, save and load again is bit-identical", "[model][checkpoint]") {
  for (const OracleCase& c : kOracleCases) {
    INFO(c.name);
    TempDir dir;
    const std::string src = OracleCaseDir(c.name);
    FlexOlmoModel first = ValueOrDie(FlexOlmoModel::Load(src));
    REQUIRE(first.Save(dir / "a").ok());
    FlexOlmoModel second = ValueOrDie(FlexOlmoModel::Load(dir / "a"));
    REQUIRE(second.Save(dir / "b").ok());

    Checkpoint original = ValueOrDie(Checkpoint::Open(src));
    Checkpoint saved = ValueOrDie(Checkpoint::Open(dir / "a"));
    CHECK(original.Names() == saved.Names());
    for (const std::string& name : original.Names()) {
      at::Tensor a = ValueOrDie(original.Get(name)), b = ValueOrDie(saved.Get(name));
      INFO(name);
      CHECK(a.scalar_type() == b.scalar_type());
      CHECK(at::equal(a, b));
    }
    CHECK(first.config().ToJson() == second.config().ToJson());
    // Saving is deterministic: the second save writes the same bytes.
    CHECK(ValueOrDie(ReadFile(dir / "a/model.safetensors")) == ValueOrDie(ReadFile(dir / "b/model.safetensors")));
    CHECK(fs::exists(dir / "a/flexfed_extras.safetensors") == fs::exists(fs::path(src) / "flexfed_extras.safetensors"));
  }
}

TEST_CASE("a sharded model loads like a single-file one", "[model][checkpoint]") {
  at::NoGradGuard no_grad;
  TempDir dir;
  FlexOlmoModel model = ValueOrDie(FlexOlmoModel::Create(ValueOrDie(ModelConfig::Preset("test", 2, 2)), at::kFloat, 5));
  REQUIRE(model.Save(dir / "sharded", /*max_shard_bytes=*/200'000).ok());
  CHECK(fs::exists(dir / ("sharded/" + std::string(kIndexFileName))));
  FlexOlmoModel back = ValueOrDie(FlexOlmoModel::Load(dir / "sharded"));
  at::Tensor ids = at::randint(0, 259, {1, 9}, at::kLong);
  CHECK(at::equal(back.Forward(ids), model.Forward(ids)));
}

TEST_CASE("a dense olmo2 checkpoint is the one-expert flex_olmo model", "[model]") {
  at::NoGradGuard no_grad;
  TempDir dir;
  const std::string src = OracleCaseDir("olmo2_f32");
  FlexOlmoModel dense = ValueOrDie(FlexOlmoModel::Load(src));
  // Rename mlp.X_proj to mlp.experts.0.X_proj, add any router (softmax over one expert is 1).
  std::vector<NamedTensor> weights;
  for (NamedTensor nt : dense.NamedParameters()) {
    const size_t p = nt.name.find(".mlp.");
    if (p != std::string::npos) nt.name.replace(p, 5, ".mlp.experts.0.");
    weights.push_back(nt);
  }
  ModelConfig config = dense.config();
  config.model_type = "flex_olmo";
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    weights.push_back({"model.layers." + std::to_string(l) + ".mlp.gate.weight", at::randn({1, config.hidden_size})});
  }
  REQUIRE(WriteCheckpoint(dir.path(), weights).ok());
  REQUIRE(WriteModelConfig(dir / "config.json", config).ok());
  FlexOlmoModel moe = ValueOrDie(FlexOlmoModel::Load(dir.path()));
  at::Tensor ids = at::randint(0, config.vocab_size, {2, 10}, at::kLong);
  CHECK(RelativeError(moe.Forward(ids), dense.Forward(ids)) < 1e-6);
}

TEST_CASE("loading refuses incomplete, misshapen or surplus checkpoints", "[model][checkpoint]") {
  TempDir dir;
  FlexOlmoModel model = ValueOrDie(FlexOlmoModel::Create(ValueOrDie(ModelConfig::Preset("test", 2, 1)), at::kFloat, 1));
  REQUIRE(model.Save(dir.path()).ok());
  std::vector<NamedTensor> weights = model.NamedParameters();
  auto load_error = [&](std::vector<NamedTensor> w) {
    REQUIRE(WriteCheckpoint(dir.path(), w).ok());
    absl::StatusOr<FlexOlmoModel> m = FlexOlmoModel::Load(dir.path());
    return m.ok() ? std::string("OK") : std::string(m.status().message());
  };
  CHECK(load_error(weights) == "OK");
  SECTION("missing tensor") {
    auto w = weights;
    w.erase(w.begin() + 3);
    CHECK_THAT(load_error(w), Catch::Contains("missing tensor '" + weights[3].name + "'"));
  }
  SECTION("wrong shape") {
    auto w = weights;
    w[1].tensor = at::zeros({3, 3});
    CHECK_THAT(load_error(w), Catch::Contains(weights[1].name) && Catch::Contains("shape [3, 3]"));
  }
  SECTION("surplus tensor") {
    auto w = weights;
    w.push_back({"model.layers.0.mlp.experts.9.gate_proj.weight", at::zeros({2})});
    CHECK_THAT(load_error(w), Catch::Contains("unexpected tensor 'model.layers.0.mlp.experts.9.gate_proj.weight'"));
  }
}

TEST_CASE("fresh models are deterministic in their seed and load in another dtype", "[model]") {
  at::NoGradGuard no_grad;
  ModelConfig config = ValueOrDie(ModelConfig::Preset("test", 2, 2));
  FlexOlmoModel a = ValueOrDie(FlexOlmoModel::Create(config, at::kFloat, 11));
  FlexOlmoModel b = ValueOrDie(FlexOlmoModel::Create(config, at::kFloat, 11));
  FlexOlmoModel c = ValueOrDie(FlexOlmoModel::Create(config, at::kFloat, 12));
  CHECK(at::equal(a.NamedParameters()[1].tensor, b.NamedParameters()[1].tensor));
  CHECK_FALSE(at::equal(a.NamedParameters()[1].tensor, c.NamedParameters()[1].tensor));

  TempDir dir;
  REQUIRE(a.Save(dir.path()).ok());
  FlexOlmoModel bf16 = ValueOrDie(FlexOlmoModel::Load(dir.path(), at::kBFloat16));
  CHECK(bf16.dtype() == at::kBFloat16);
  at::Tensor ids = at::randint(0, 259, {1, 8}, at::kLong);
  CHECK(bf16.Forward(ids).scalar_type() == at::kBFloat16);
  CHECK(RelativeError(bf16.Forward(ids), a.Forward(ids)) < 5e-2);
}

}  // namespace
}  // namespace flexfed
