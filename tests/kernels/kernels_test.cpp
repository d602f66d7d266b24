// Every kernel (the MoE ops, AdamW) against its CPU reference (kernels/moe_ops.h) on fresh random inputs, by relative
// error, in fp32 and bf16, on the shapes that break dispatch code: all tokens to one expert, experts
// with no tokens, excluded experts, k = E, ties, odd sizes. Torch-free: it needs only the CUDA
// runtime, and without a GPU every case is skipped with a message saying so.
#include <catch2/catch.hpp>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/adamw.cuh"
#include "kernels/cuda_check.cuh"
#include "kernels/moe_align.cuh"
#include "kernels/moe_combine.cuh"
#include "kernels/moe_ops.h"
#include "kernels/moe_router.cuh"
#include "kernels/swiglu.cuh"

namespace flexfed::kernels {
namespace {

bool HaveGpu() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    WARN("no CUDA device: this [gpu] test is skipped (run it on a machine with a GPU; see bench/gpu/README.md)");
    return false;
  }
  return true;
}

// A device copy of a host vector; reads back with Host().
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(const std::vector<T>& host) : size_(host.size()) {
    FLEXFED_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(1, size_) * sizeof(T)));
    if (size_ > 0) FLEXFED_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  explicit DeviceBuffer(size_t size) : DeviceBuffer(std::vector<T>(size)) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr_); }
  T* get() { return static_cast<T*>(ptr_); }
  std::vector<T> Host() const {
    FLEXFED_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> host(size_);
    if (size_ > 0) FLEXFED_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_;
};

std::mt19937& Rng() {
  static std::mt19937 rng(20261125);
  return rng;
}

std::vector<float> Normal(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(Rng());
  return v;
}

// Hidden-state buffers as raw bytes of the dtype under test.
std::vector<uint8_t> Encode(const std::vector<float>& v, DType t) {
  std::vector<uint8_t> bytes(v.size() * DTypeSize(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::kF32) {
      std::memcpy(bytes.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t b = FloatToBf16(v[i]);
      std::memcpy(bytes.data() + 2 * i, &b, 2);
    }
  }
  return bytes;
}

std::vector<float> Decode(const std::vector<uint8_t>& bytes, DType t) {
  std::vector<float> v(bytes.size() / DTypeSize(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::kF32) {
      std::memcpy(&v[i], bytes.data() + 4 * i, 4);
    } else {
      uint16_t b;
      std::memcpy(&b, bytes.data() + 2 * i, 2);
      v[i] = Bf16ToFloat(b);
    }
  }
  return v;
}

// max |got − want| / max |want|.
double RelativeError(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
  }
  return diff / scale;
}

double Tolerance(DType t) { return t == DType::kF32 ? 2e-6 : 1e-2; }
const char* Name(DType t) { return t == DType::kF32 ? "fp32" : "bf16"; }

struct RouterCase {
  const char* name;
  int64_t tokens;
  int experts, top_k;
  bool bias, mask, normalize, ties;
};

void CheckRouter(const RouterCase& c) {
  INFO("router case " << c.name << ": N=" << c.tokens << " E=" << c.experts << " K=" << c.top_k);
  const int64_t n = c.tokens;
  const int e_count = c.experts, k = c.top_k;
  std::vector<float> logits = Normal(n * e_count, 2.0f);
  if (c.ties) {  // expert 1 copies expert 0 in every row and expert E-1 copies expert 2: exact ties
    for (int64_t i = 0; i < n; ++i) {
      logits[i * e_count + 1] = logits[i * e_count];
      if (e_count > 3) logits[i * e_count + e_count - 1] = logits[i * e_count + 2];
    }
  }
  std::vector<float> bias = Normal(e_count);
  std::vector<uint8_t> allowed(e_count, 1);
  if (c.mask) {
    for (int e = 1; e < e_count; e += 3) allowed[e] = 0;
  }
  int allowed_count = 0;
  for (uint8_t a : allowed) allowed_count += a;
  const int top_k = c.mask ? std::min(k, std::max(1, allowed_count)) : k;

  std::vector<float> want_logits(n * e_count), want_w(n * top_k);
  std::vector<int32_t> want_idx(n * top_k);
  RouterArgs ref{logits.data(), c.bias ? bias.data() : nullptr, c.mask ? allowed.data() : nullptr,
                 want_logits.data(), want_w.data(), want_idx.data(), n, e_count, top_k, c.normalize};
  RouterReference(ref);

  DeviceBuffer<float> d_logits(logits), d_bias(bias), d_out(n * e_count), d_w(n * top_k);
  DeviceBuffer<uint8_t> d_allowed(allowed);
  DeviceBuffer<int32_t> d_idx(n * top_k);
  RouterArgs dev{d_logits.get(), c.bias ? d_bias.get() : nullptr, c.mask ? d_allowed.get() : nullptr, d_out.get(),
                 d_w.get(), d_idx.get(), n, e_count, top_k, c.normalize};
  Router(dev, nullptr);
  const std::vector<float> got_logits = d_out.Host(), got_w = d_w.Host();
  const std::vector<int32_t> got_idx = d_idx.Host();
  for (size_t i = 0; i < got_logits.size(); ++i) {
    if (std::isinf(want_logits[i])) {
      REQUIRE(got_logits[i] == want_logits[i]);
    } else {
      REQUIRE(std::fabs(got_logits[i] - want_logits[i]) <= 1e-6f * std::max(1.0f, std::fabs(want_logits[i])));
    }
  }
  CHECK(RelativeError(got_w, want_w) < 1e-5);
  // Indices agree exactly, except where two probabilities differ by rounding alone.
  int64_t mismatches = 0;
  for (size_t i = 0; i < got_idx.size(); ++i) {
    if (got_idx[i] != want_idx[i]) {
      ++mismatches;
      REQUIRE(std::fabs(got_w[i] - want_w[i]) <= 1e-6f);
    }
  }
  CHECK(mismatches <= static_cast<int64_t>(got_idx.size() / 1000));
  if (c.ties) {  // each tied pair: the lower index first, on the GPU as in the reference
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* row = got_idx.data() + i * top_k;
      const int32_t* pos0 = std::find(row, row + top_k, 0);
      const int32_t* pos1 = std::find(row, row + top_k, 1);
      if (pos1 != row + top_k) REQUIRE(pos0 < pos1);
    }
  }
  if (c.mask) {
    for (int64_t i = 0; i < n * top_k; ++i) REQUIRE(allowed[got_idx[i]] == 1);
  }

  // Backward, from the forward's outputs and a random weight gradient.
  std::vector<float> grad_w = Normal(n * top_k);
  std::vector<float> want_grad(n * e_count);
  RouterBackwardArgs rb{want_logits.data(), want_idx.data(), want_w.data(), grad_w.data(), want_grad.data(),
                        n, e_count, top_k, c.normalize};
  RouterBackwardReference(rb);
  DeviceBuffer<float> d_gw(grad_w), d_grad(n * e_count), d_ref_logits(want_logits), d_ref_w(want_w);
  DeviceBuffer<int32_t> d_ref_idx(want_idx);
  RouterBackwardArgs db{d_ref_logits.get(), d_ref_idx.get(), d_ref_w.get(), d_gw.get(), d_grad.get(),
                        n, e_count, top_k, c.normalize};
  RouterBackward(db, nullptr);
  CHECK(RelativeError(d_grad.Host(), want_grad) < 1e-5);
}

TEST_CASE("router kernel matches its reference", "[gpu]") {
  if (!HaveGpu()) return;
  const RouterCase cases[] = {
      {"8 experts, k=2", 4099, 8, 2, false, false, false, false},
      {"bias and renormalised", 1001, 8, 4, true, false, true, false},
      {"k = E", 513, 7, 7, true, false, false, false},
      {"excluded experts", 777, 9, 4, true, true, false, false},
      {"ties", 2048, 6, 3, false, false, false, true},
      {"wide: 40 experts", 301, 40, 5, true, true, true, false},
      {"widest: 256 experts, k=E", 65, 256, 256, true, false, true, false},
      {"one expert", 129, 1, 1, true, false, false, false},
      {"no tokens", 0, 4, 2, false, false, false, false},
  };
  for (const RouterCase& c : cases) CheckRouter(c);
}

void CheckAlign(const std::string& name, const std::vector<int32_t>& indices, int experts) {
  INFO("align case " << name << ": M=" << indices.size() << " E=" << experts);
  const int64_t m = static_cast<int64_t>(indices.size());
  std::vector<int32_t> counts(experts), offsets(experts + 1), sorted(m), position(m);
  AlignReference({indices.data(), counts.data(), offsets.data(), sorted.data(), position.data(), nullptr, m, experts});
  DeviceBuffer<int32_t> d_idx(indices), d_counts(experts), d_offsets(experts + 1), d_sorted(m), d_position(m);
  DeviceBuffer<uint8_t> d_work(AlignWorkspaceBytes(m, experts));
  Align({d_idx.get(), d_counts.get(), d_offsets.get(), d_sorted.get(), d_position.get(), d_work.get(), m, experts},
        nullptr);
  REQUIRE(d_counts.Host() == counts);
  REQUIRE(d_offsets.Host() == offsets);
  REQUIRE(d_sorted.Host() == sorted);  // stable: exactly the reference's order
  REQUIRE(d_position.Host() == position);
}

TEST_CASE("align kernel matches its reference", "[gpu]") {
  if (!HaveGpu()) return;
  auto random = [](int64_t m, int experts, int used) {
    std::uniform_int_distribution<int32_t> d(0, used - 1);
    std::vector<int32_t> v(m);
    for (int32_t& x : v) x = d(Rng()) * (experts / used);  // only every (E/used)-th expert gets slots
    return v;
  };
  CheckAlign("random, 8 experts", random(4096 * 5 + 3, 8, 8), 8);
  CheckAlign("experts with no tokens", random(10007, 12, 4), 12);
  CheckAlign("all slots to one expert", std::vector<int32_t>(9000, 5), 7);
  CheckAlign("one slot", {3}, 4);
  CheckAlign("no slots", {}, 4);
  CheckAlign("256 experts, odd size", random(70001, 256, 256), 256);
}

struct MoveCase {
  int64_t tokens, hidden;
  int top_k, experts;
};

void CheckDataMovers(const MoveCase& c, DType t) {
  INFO("N=" << c.tokens << " H=" << c.hidden << " K=" << c.top_k << " " << Name(t));
  const int64_t n = c.tokens, h = c.hidden, m = n * c.top_k;
  // A routing: distinct experts per token.
  std::vector<int32_t> idx(m);
  std::vector<int32_t> perm(c.experts);
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t i = 0; i < n; ++i) {
    std::shuffle(perm.begin(), perm.end(), Rng());
    for (int j = 0; j < c.top_k; ++j) idx[i * c.top_k + j] = perm[j];
  }
  std::vector<int32_t> counts(c.experts), offsets(c.experts + 1), sorted(m), position(m);
  AlignReference({idx.data(), counts.data(), offsets.data(), sorted.data(), position.data(), nullptr, m, c.experts});
  DeviceBuffer<int32_t> d_sorted(sorted), d_position(position);
  const size_t es = DTypeSize(t);
  const std::vector<float> weights = Normal(m);
  DeviceBuffer<float> d_weights(weights);

  // Gather and its adjoint.
  const std::vector<uint8_t> x = Encode(Normal(n * h), t);
  std::vector<uint8_t> want_rows(m * h * es);
  GatherReference({x.data(), sorted.data(), want_rows.data(), m, h, c.top_k, t});
  DeviceBuffer<uint8_t> d_x(x), d_rows(m * h * es);
  Gather({d_x.get(), d_sorted.get(), d_rows.get(), m, h, c.top_k, t}, nullptr);
  REQUIRE(d_rows.Host() == want_rows);  // a copy: bit for bit

  const std::vector<uint8_t> grad_rows = Encode(Normal(m * h), t);
  std::vector<uint8_t> want_gx(n * h * es);
  GatherBackwardReference({grad_rows.data(), position.data(), want_gx.data(), n, h, c.top_k, t});
  DeviceBuffer<uint8_t> d_grad_rows(grad_rows), d_gx(n * h * es);
  GatherBackward({d_grad_rows.get(), d_position.get(), d_gx.get(), n, h, c.top_k, t}, nullptr);
  CHECK(RelativeError(Decode(d_gx.Host(), t), Decode(want_gx, t)) < Tolerance(t));

  // Combine and its backward.
  std::vector<uint8_t> want_out(n * h * es);
  CombineReference({want_rows.data(), weights.data(), position.data(), want_out.data(), n, h, c.top_k, t});
  DeviceBuffer<uint8_t> d_out(n * h * es);
  Combine({d_rows.get(), d_weights.get(), d_position.get(), d_out.get(), n, h, c.top_k, t}, nullptr);
  CHECK(RelativeError(Decode(d_out.Host(), t), Decode(want_out, t)) < Tolerance(t));

  const std::vector<uint8_t> grad_out = Encode(Normal(n * h), t);
  std::vector<uint8_t> want_grad_rows(m * h * es);
  std::vector<float> want_grad_w(m);
  CombineBackwardReference({grad_out.data(), want_rows.data(), weights.data(), sorted.data(), want_grad_rows.data(),
                            want_grad_w.data(), m, h, c.top_k, t});
  DeviceBuffer<uint8_t> d_grad_out(grad_out), d_grad_rows2(m * h * es);
  DeviceBuffer<float> d_grad_w(m);
  CombineBackward({d_grad_out.get(), d_rows.get(), d_weights.get(), d_sorted.get(), d_grad_rows2.get(), d_grad_w.get(),
                   m, h, c.top_k, t},
                  nullptr);
  CHECK(RelativeError(Decode(d_grad_rows2.Host(), t), Decode(want_grad_rows, t)) < Tolerance(t));
  CHECK(RelativeError(d_grad_w.Host(), want_grad_w) < (t == DType::kF32 ? 1e-5 : 1e-4));
}

TEST_CASE("gather, combine and their adjoints match their references", "[gpu]") {
  if (!HaveGpu()) return;
  for (DType t : {DType::kF32, DType::kBF16}) {
    CheckDataMovers({1000, 256, 2, 8}, t);   // 16-byte packs
    CheckDataMovers({333, 67, 3, 5}, t);     // odd hidden size: element by element
    CheckDataMovers({129, 512, 4, 4}, t);    // k = E
    CheckDataMovers({257, 130, 1, 1}, t);    // one expert takes every token
  }
}

TEST_CASE("SwiGLU kernel matches its reference", "[gpu]") {
  if (!HaveGpu()) return;
  for (DType t : {DType::kF32, DType::kBF16}) {
    for (int64_t count : {int64_t{1} << 20, int64_t{100003}, int64_t{7}}) {
      INFO(Name(t) << " count " << count);
      const size_t es = DTypeSize(t);
      const std::vector<uint8_t> gate = Encode(Normal(count, 3.0f), t), up = Encode(Normal(count), t),
                                 grad = Encode(Normal(count), t);
      std::vector<uint8_t> want(count * es), want_dg(count * es), want_du(count * es);
      SwiGluReference({gate.data(), up.data(), want.data(), count, t});
      SwiGluBackwardReference({grad.data(), gate.data(), up.data(), want_dg.data(), want_du.data(), count, t});
      DeviceBuffer<uint8_t> d_gate(gate), d_up(up), d_grad(grad), d_out(count * es), d_dg(count * es), d_du(count * es);
      SwiGlu({d_gate.get(), d_up.get(), d_out.get(), count, t}, nullptr);
      SwiGluBackward({d_grad.get(), d_gate.get(), d_up.get(), d_dg.get(), d_du.get(), count, t}, nullptr);
      CHECK(RelativeError(Decode(d_out.Host(), t), Decode(want, t)) < Tolerance(t));
      CHECK(RelativeError(Decode(d_dg.Host(), t), Decode(want_dg, t)) < Tolerance(t));
      CHECK(RelativeError(Decode(d_du.Host(), t), Decode(want_du, t)) < Tolerance(t));
    }
  }
}

TEST_CASE("AdamW kernel matches its reference, fp32 and bf16 moments", "[gpu]") {
  if (!HaveGpu()) return;
  for (DType t : {DType::kF32, DType::kBF16}) {
    for (int64_t count : {int64_t{1} << 20, int64_t{100003}, int64_t{7}}) {
      INFO(Name(t) << " moments, count " << count);
      std::vector<float> param = Normal(count), grad = Normal(count, 0.01f);
      std::vector<uint8_t> m = Encode(Normal(count, 0.01f), t), v;
      std::vector<float> v_values = Normal(count, 1e-4f);
      for (float& x : v_values) x = x * x;  // a second moment is not negative
      v = Encode(v_values, t);
      DeviceBuffer<float> d_param(param), d_grad(grad);
      DeviceBuffer<uint8_t> d_m(m), d_v(v);
      AdamWArgs a = AdamWStepScalars(3e-4, 0.9, 0.95, 1e-8, 0.1, 7);
      a.moments = t;
      a.count = count;
      AdamWArgs host = a;
      host.param = param.data();
      host.grad = grad.data();
      host.exp_avg = m.data();
      host.exp_avg_sq = v.data();
      AdamWReference(host);
      AdamWArgs device = a;
      device.param = d_param.get();
      device.grad = d_grad.get();
      device.exp_avg = d_m.get();
      device.exp_avg_sq = d_v.get();
      AdamW(device, nullptr);
      // fp32 throughout: the same operations, contracted into fused multiply-adds differently.
      CHECK(RelativeError(d_param.Host(), param) < 1e-6);
      CHECK(RelativeError(Decode(d_m.Host(), t), Decode(m, t)) < Tolerance(t));
      CHECK(RelativeError(Decode(d_v.Host(), t), Decode(v, t)) < Tolerance(t));
    }
  }
}

// Host-side checks: no device needed, so this runs everywhere the kernels build.
TEST_CASE("kernels refuse shapes outside their limits", "[kernels]") {
  RouterArgs a;
  a.tokens = 4;
  a.experts = kMaxExperts + 1;
  a.top_k = 1;
  CHECK_THROWS_WITH(Router(a, nullptr), Catch::Contains("experts"));
  a.experts = 4;
  a.top_k = 5;
  CHECK_THROWS_WITH(Router(a, nullptr), Catch::Contains("top_k"));
}

}  // namespace
}  // namespace flexfed::kernels
