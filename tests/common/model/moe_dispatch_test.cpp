// The MoE dispatch path (common/model/moe_dispatch.h) on the CPU, where every op is its reference
// (kernels/moe_reference.cpp): it must compute what the LibTorch path (moe.h, which matches Hugging
// Face) computes, forward and backward, so the GPU kernels tested against the same references
// (tests/kernels/) compute it too.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#if FLEXFED_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/core/model_config.h"
#include "common/model/autocast.h"
#include "common/model/model.h"
#include "common/model/moe.h"
#include "common/model/moe_dispatch.h"
#include "kernels/moe_ops.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::RelativeError;

TEST_CASE("the align reference orders slots by expert, stably", "[moe]") {
  // Tokens 0..3 with K = 2: slots (0: 2, 1), (1: 0, 2), (2: 2, 0), (3: 1, 2). Expert 3 gets nothing.
  const std::vector<int32_t> indices = {2, 1, 0, 2, 2, 0, 1, 2};
  std::vector<int32_t> counts(4), offsets(5), sorted(8), position(8);
  kernels::AlignReference({indices.data(), counts.data(), offsets.data(), sorted.data(), position.data(), nullptr, 8, 4});
  CHECK(counts == std::vector<int32_t>{2, 2, 4, 0});
  CHECK(offsets == std::vector<int32_t>{0, 2, 4, 8, 8});
  CHECK(sorted == std::vector<int32_t>{2, 5, 1, 6, 0, 3, 4, 7});
  for (int32_t p = 0; p < 8; ++p) CHECK(position[sorted[p]] == p);
  CHECK_THROWS_WITH(kernels::AlignReference({indices.data(), counts.data(), offsets.data(), sorted.data(),
                                             position.data(), nullptr, 8, 2}),
                    Catch::Contains("out of range"));
}

TEST_CASE("the router reference breaks ties to the lower expert and renormalises only when asked", "[moe]") {
  // Experts 1 and 2 tie; expert 0 is excluded; expert 3 has a bias of +5 that min(b, 0) ignores.
  const std::vector<float> logits = {9.0f, 1.0f, 1.0f, 0.5f};
  const std::vector<float> bias = {-100.0f, 0.0f, 0.0f, 5.0f};
  const std::vector<uint8_t> allowed = {0, 1, 1, 1};
  std::vector<float> out(4), w(2);
  std::vector<int32_t> idx(2);
  kernels::RouterArgs a{logits.data(), bias.data(), allowed.data(), out.data(), w.data(), idx.data(), 1, 4, 2, false};
  kernels::RouterReference(a);
  CHECK(out[0] == -std::numeric_limits<float>::infinity());
  CHECK(out[3] == 0.5f);
  CHECK(idx == std::vector<int32_t>{1, 2});
  CHECK(w[0] == w[1]);
  CHECK(w[0] + w[1] < 1.0f);  // expert 3 holds the rest of the mass
  a.normalize = true;
  kernels::RouterReference(a);
  CHECK(w[0] == Approx(0.5f));
}

TEST_CASE("a NaN router logit still yields valid, distinct experts", "[moe]") {
  const std::vector<float> logits = {std::nanf(""), 1.0f, 2.0f, 0.0f};
  std::vector<float> out(4), w(3);
  std::vector<int32_t> idx(3);
  kernels::RouterReference({logits.data(), nullptr, nullptr, out.data(), w.data(), idx.data(), 1, 4, 3, false});
  std::vector<int32_t> sorted = idx;
  std::sort(sorted.begin(), sorted.end());
  CHECK(std::unique(sorted.begin(), sorted.end()) == sorted.end());
  for (int32_t e : idx) CHECK((e >= 0 && e < 4));
  CHECK(std::isnan(w[0]));  // the NaN reaches the weights (and the loss), not the indices
}

TEST_CASE("bf16 conversion rounds to nearest even like LibTorch", "[moe]") {
  const at::Tensor x = at::randn({4096}) * 100;
  const at::Tensor b = x.to(at::kBFloat16);
  const float* xf = x.data_ptr<float>();
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < x.numel(); ++i) REQUIRE(kernels::FloatToBf16(xf[i]) == bits[i]);
  CHECK(kernels::Bf16ToFloat(bits[7]) == b[7].item<float>());
}

struct Layer {
  at::Tensor x, router, bias;
  std::vector<ExpertWeights> experts;
};

// Fresh leaves requiring gradients. Expert weights scaled so outputs are O(1).
Layer MakeLayer(int64_t tokens, int64_t hidden, int64_t ffn, int64_t experts, at::ScalarType dtype, bool with_bias,
                at::Device device = at::kCPU) {
  Layer l;
  l.x = at::randn({tokens, hidden}).to(device, dtype).requires_grad_();
  l.router = at::randn({experts, hidden}).mul(0.3).to(device, dtype).requires_grad_();
  if (with_bias) {
    // Negative, positive and exactly zero entries: min(b, 0) passes gradient only where b ≤ 0.
    at::Tensor b = at::randn({experts});
    if (experts > 2) b[2].fill_(0.0);
    l.bias = b.to(device).requires_grad_();
  }
  for (int64_t e = 0; e < experts; ++e) {
    l.experts.push_back({(at::randn({ffn, hidden}) / std::sqrt(hidden)).to(device, dtype).requires_grad_(),
                         (at::randn({ffn, hidden}) / std::sqrt(hidden)).to(device, dtype).requires_grad_(),
                         (at::randn({hidden, ffn}) / std::sqrt(ffn)).to(device, dtype).requires_grad_()});
  }
  return l;
}

std::vector<at::Tensor> Leaves(const Layer& l) {
  std::vector<at::Tensor> t = {l.x, l.router};
  if (l.bias.defined()) t.push_back(l.bias);
  for (const ExpertWeights& e : l.experts) {
    t.push_back(e.gate_proj);
    t.push_back(e.up_proj);
    t.push_back(e.down_proj);
  }
  return t;
}

struct Result {
  at::Tensor out, logits, indices;
  std::vector<at::Tensor> grads;  // per leaf; zeros where a leaf got none
};

// Runs one path and backpropagates Σ out·probe + 0.01·mean(logsumexp(logits)²) (a z-loss term, so
// the logits output's own gradient is exercised too).
template <typename Fn>
Result RunPath(const Layer& l, const at::Tensor& probe, Fn&& path) {
  for (const at::Tensor& t : Leaves(l)) {
    if (t.grad().defined()) t.mutable_grad().zero_();
  }
  Result r;
  std::tie(r.out, r.logits, r.indices) = path();
  at::Tensor logits = r.logits.masked_fill(r.logits.isinf(), 0);  // excluded experts: no z-term
  const at::Tensor loss = (r.out.to(at::kFloat) * probe).sum() + 0.01 * at::logsumexp(logits, -1).pow(2).mean();
  loss.backward();
  for (const at::Tensor& t : Leaves(l)) r.grads.push_back(t.grad().defined() ? t.grad().clone() : at::zeros_like(t));
  return r;
}

void CompareWithLibTorch(const Layer& l, const at::Tensor& mask, int64_t top_k, bool normalize, double tol) {
  const at::Tensor probe = at::randn({l.x.size(0), l.x.size(1)}).to(l.x.device());
  const Result want = RunPath(l, probe, [&] {
    RouterOutput route = Route(l.x, l.router, l.bias, mask, top_k, normalize);
    return std::make_tuple(CombineExperts(l.x, l.experts, route), route.logits, route.indices);
  });
  const Result got = RunPath(l, probe, [&] {
    DispatchMoeOutput r = DispatchMoe(l.x, l.router, l.bias, mask, top_k, normalize, l.experts);
    return std::make_tuple(r.out, r.logits, r.indices);
  });
  REQUIRE(got.out.scalar_type() == l.x.scalar_type());
  CHECK(at::equal(got.indices, want.indices));
  CHECK(RelativeError(got.logits.masked_fill(got.logits.isinf(), 0), want.logits.masked_fill(want.logits.isinf(), 0)) <
        1e-6);
  CHECK(at::equal(got.logits.isinf(), want.logits.isinf()));
  CHECK(RelativeError(got.out, want.out) < tol);
  for (size_t i = 0; i < want.grads.size(); ++i) {
    INFO("gradient of leaf " << i << " (x, router, [bias], then gate/up/down per expert)");
    CHECK(RelativeError(got.grads[i], want.grads[i]) < tol * 10);
    CHECK(got.grads[i].scalar_type() == want.grads[i].scalar_type());
  }
}

TEST_CASE("the dispatch path equals the LibTorch path, forward and backward (fp32)", "[moe]") {
  at::manual_seed(7);
  {
    INFO("4 experts, k = 2, bias");
    CompareWithLibTorch(MakeLayer(97, 32, 48, 4, at::kFloat, true), {}, 2, false, 1e-5);
  }
  {
    INFO("k = E, renormalised");
    CompareWithLibTorch(MakeLayer(64, 24, 40, 3, at::kFloat, true), {}, 3, true, 1e-5);
  }
  {
    INFO("excluded experts (opt-out mask), k capped at the allowed count");
    at::Tensor mask = at::zeros({5});
    mask[1] = -std::numeric_limits<float>::infinity();
    mask[3] = -std::numeric_limits<float>::infinity();
    CompareWithLibTorch(MakeLayer(50, 16, 20, 5, at::kFloat, true), mask, 3, false, 1e-5);
  }
  {
    // Top-k of k with nothing excluded: the slices are known on the host (no counts read back),
    // which must hold even for an expert whose probability underflows to exactly 0.
    INFO("k = E, one expert's probability 0 for every token (the owner's top-2 of 2, bias -1e4)");
    Layer l = MakeLayer(45, 16, 20, 2, at::kFloat, true);
    {
      at::NoGradGuard no_grad;
      l.bias[1] = -1e4;
    }
    REQUIRE(at::all(Route(l.x, l.router, l.bias, {}, 2, false).weights.select(1, 1) == 0).item<bool>());
    CompareWithLibTorch(l, {}, 2, false, 1e-5);
  }
  {
    INFO("one expert: every token to it");
    CompareWithLibTorch(MakeLayer(33, 16, 20, 1, at::kFloat, false), {}, 1, false, 1e-5);
  }
  {
    INFO("an expert no token reaches, and one every token's first choice is");
    Layer l = MakeLayer(40, 16, 20, 4, at::kFloat, false);
    {
      at::NoGradGuard no_grad;
      l.x.abs_();                            // x > 0, so a row's sign decides its logit's
      l.router[1].abs_().add_(1.0);          // expert 1: the largest logit for every token
      l.router[3].abs_().add_(1.0).neg_();   // expert 3: the smallest for every token
    }
    RouterOutput route = Route(l.x, l.router, l.bias, {}, 2, false);
    REQUIRE(at::all(route.indices.select(1, 0) == 1).item<bool>());
    REQUIRE(at::all(route.indices != 3).item<bool>());
    CompareWithLibTorch(l, {}, 2, false, 1e-5);
    INFO("k = 1: all tokens to expert 1");
    CompareWithLibTorch(l, {}, 1, false, 1e-5);
  }
}

// Top-k of k with nothing opted out (the owner's training): the experts read the tokens' rows in
// place. The same numbers as the gathered path (forced here by a mask that allows every expert),
// with the E gathered copies of the rows no longer kept for the backward.
TEST_CASE("every token to every expert: no gather, the gathered path's numbers, fewer rows kept", "[moe]") {
  at::manual_seed(41);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);  // every tensor from the main thread's heap, which HeapInUse counts
  const Layer l = MakeLayer(512, 64, 96, 2, at::kFloat, true);
  const at::Tensor all_allowed = at::zeros({2});
  const at::Tensor probe = at::randn({512, 64});
  auto kept = [&](const at::Tensor& mask) {  // heap the forward leaves alive for the backward
    const int64_t before = testing::HeapInUse();
    DispatchMoeOutput r = DispatchMoe(l.x, l.router, l.bias, mask, 2, false, l.experts);
    return testing::HeapInUse() - before;
  };
  kept({});
  kept(all_allowed);  // first calls allocate what stays for later ones
  const int64_t in_place = kept({}), gathered = kept(all_allowed);
  // The gathered path keeps the 2 × 512 rows of 64 fp32 (x is already fp32: in place, nothing is copied).
  CHECK(gathered - in_place >= 2 * 512 * 64 * 4);
  CHECK(gathered - in_place < 2 * 512 * 64 * 4 + 64 * 1024);
  const Result a = RunPath(l, probe, [&] {
    DispatchMoeOutput r = DispatchMoe(l.x, l.router, l.bias, {}, 2, false, l.experts);
    return std::make_tuple(r.out, r.logits, r.indices);
  });
  const Result b = RunPath(l, probe, [&] {
    DispatchMoeOutput r = DispatchMoe(l.x, l.router, l.bias, all_allowed, 2, false, l.experts);
    return std::make_tuple(r.out, r.logits, r.indices);
  });
  at::set_num_threads(threads);
  CHECK(at::equal(a.out, b.out));  // the same products on the same values
  for (size_t i = 0; i < a.grads.size(); ++i) {
    INFO("gradient of leaf " << i);
    // x's: the experts' contributions summed by the products (in place) or by the gather's adjoint.
    CHECK(RelativeError(a.grads[i], b.grads[i]) < 1e-6);
  }
}

TEST_CASE("the dispatch path equals the LibTorch path in bf16", "[moe]") {
  at::manual_seed(8);
  // One rounding of each output row here vs one per expert there: a few bf16 ulps.
  CompareWithLibTorch(MakeLayer(80, 32, 48, 4, at::kBFloat16, true), {}, 2, false, 2e-2);
}

TEST_CASE("under autocast the experts run in bf16 and the router stays fp32", "[moe]") {
  at::manual_seed(9);
  const Layer l = MakeLayer(64, 32, 48, 4, at::kFloat, true);
  const DispatchMoeOutput fp32 = DispatchMoe(l.x, l.router, l.bias, {}, 2, false, l.experts);
  DispatchMoeOutput mixed;
  {
    const AutocastScope autocast(at::kCPU, at::kBFloat16);
    REQUIRE(AutocastDtype(at::kCPU) == at::kBFloat16);
    mixed = DispatchMoe(l.x, l.router, l.bias, {}, 2, false, l.experts);
  }
  CHECK_FALSE(AutocastDtype(at::kCPU).has_value());
  CHECK(mixed.out.scalar_type() == at::kFloat);
  CHECK(at::equal(mixed.logits, fp32.logits));  // the router ignored autocast
  const double err = RelativeError(mixed.out, fp32.out);
  CHECK(err > 0);  // the products really ran in bf16
  CHECK(err < 3e-2);
  mixed.out.sum().backward();
  CHECK(l.experts[0].gate_proj.grad().scalar_type() == at::kFloat);  // master weights keep fp32 gradients
  CHECK(l.router.grad().defined());
}

TEST_CASE("on a GPU the kernels equal the LibTorch path, forward and backward", "[gpu]") {
  if (!at::hasCUDA() || !UseDispatchMoe(at::Device(at::kCUDA, 0))) {
    WARN("no CUDA device, or a build without the CUDA kernels: this [gpu] test is skipped (docs/GPU.md)");
    return;
  }
  at::manual_seed(10);
  const at::Device gpu(at::kCUDA, 0);
  {
    INFO("fp32, 4 experts, k = 2, bias");
    CompareWithLibTorch(MakeLayer(1000, 64, 96, 4, at::kFloat, true, gpu), {}, 2, false, 1e-4);
  }
  {
    INFO("fp32, excluded experts, k = E of the allowed, renormalised");
    at::Tensor mask = at::zeros({5});
    mask[2] = -std::numeric_limits<float>::infinity();
    CompareWithLibTorch(MakeLayer(513, 72, 40, 5, at::kFloat, true, gpu), mask.to(gpu), 4, true, 1e-4);
  }
  {
    INFO("bf16, 8 experts, k = 2");
    CompareWithLibTorch(MakeLayer(4096, 128, 256, 8, at::kBFloat16, true, gpu), {}, 2, false, 3e-2);
  }
}

// The owner's step routes every token to both experts (top-2 of 2): the experts' slices are known on
// the host, so no layer waits for the GPU to report its counts, forward or backward.
TEST_CASE("on a GPU the owner's training forward and backward never wait for the device", "[gpu]") {
  if (!at::hasCUDA() || !UseDispatchMoe(at::Device(at::kCUDA, 0))) {
    WARN("no CUDA device, or a build without the CUDA kernels: this [gpu] test is skipped (docs/GPU.md)");
    return;
  }
#if FLEXFED_WITH_CUDA
  at::manual_seed(11);
  const at::Device gpu(at::kCUDA, 0);
  const ModelConfig config = *ModelConfig::Preset("test", 2, 2);
  FlexOlmoModel model = *FlexOlmoModel::Create(config, at::kFloat, 3, /*with_router_bias=*/true);
  model.To(gpu);
  std::vector<at::Tensor> trained;
  for (const LayerWeights& w : model.layers()) {
    for (const at::Tensor& t : {w.experts[1].gate_proj, w.experts[1].up_proj, w.experts[1].down_proj, w.router}) {
      trained.push_back(t);
      t.requires_grad_(true);
    }
  }
  const at::Tensor ids = at::randint(0, config.vocab_size, {2, 48}, at::TensorOptions().dtype(at::kLong).device(gpu));
  c10::cuda::device_synchronize();
  struct SyncIsAnError {  // any synchronising call (a device→host copy, .item(), a stream wait) throws
    SyncIsAnError() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR); }
    ~SyncIsAnError() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED); }
  };
  {
    const SyncIsAnError guard;
    const AutocastScope bf16(at::kCUDA, at::kBFloat16);
    ForwardTrace trace;
    const at::Tensor hidden = model.ForwardHidden(ids, {}, nullptr, &trace);
    REQUIRE(trace.expert_indices.size() == static_cast<size_t>(config.num_hidden_layers));
    at::Tensor loss = hidden.to(at::kFloat).pow(2).mean();
    for (const at::Tensor& logits : trace.router_logits) loss = loss + at::logsumexp(logits, -1).pow(2).mean();
    CHECK_NOTHROW(loss.backward());
  }
  for (const at::Tensor& t : trained) CHECK(t.grad().defined());
#endif
}

}  // namespace
}  // namespace flexfed
