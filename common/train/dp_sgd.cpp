#include "common/train/dp_sgd.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

namespace flexfed {
namespace {

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t StepSeed(uint64_t seed, int64_t step, uint64_t stream) {
  uint64_t state = seed ^ (0xD1B54A32D192ED03ull * (static_cast<uint64_t>(step) + 1)) ^ (stream << 56);
  SplitMix64(state);
  return SplitMix64(state);
}

// Each sequence's row range: rows ascending means sequences ascending, so ranges are contiguous.
// rows: [n] int64 on any device. Returns (sequence, first row, count) for non-empty sequences.
struct Segment {
  int64_t sequence, begin, count;
};
std::vector<Segment> Segments(const at::Tensor& rows, int64_t seq_len) {
  const at::Tensor seq = at::div(rows, seq_len, "floor").to(at::kCPU).contiguous();
  const int64_t* s = seq.data_ptr<int64_t>();
  std::vector<Segment> out;
  for (int64_t i = 0; i < seq.size(0); ++i) {
    if (out.empty() || out.back().sequence != s[i]) {
      TORCH_CHECK(out.empty() || s[i] > out.back().sequence, "per-sequence norms: rows must be ascending");
      out.push_back({s[i], i, 0});
    }
    ++out.back().count;
  }
  return out;
}

}  // namespace

std::vector<int64_t> PoissonSample(int64_t n, double q, uint64_t seed, int64_t step) {
  std::vector<int64_t> out;
  if (n <= 0 || !(q > 0)) return out;
  uint64_t state = StepSeed(seed, step, /*stream=*/1);
  const double log_miss = std::log1p(-std::min(q, 1.0));  // -inf when q = 1: no gaps
  for (int64_t i = -1;;) {
    // The gap to the next chosen index is geometric: floor(log U / log(1 − q)), U uniform in (0, 1].
    const double u = static_cast<double>((SplitMix64(state) >> 11) + 1) * 0x1.0p-53;
    const double gap = std::floor(std::log(u) / log_miss);
    if (!(gap < static_cast<double>(n))) break;
    i += 1 + static_cast<int64_t>(gap);
    if (i >= n) break;
    out.push_back(i);
  }
  return out;
}

void AddLinearNormsSq(const at::Tensor& x, const at::Tensor& g, const at::Tensor& rows, int64_t seq_len, at::Tensor& out) {
  if (!rows.defined() || rows.numel() == 0) return;
  const at::Tensor x32 = x.to(at::kFloat), g32 = g.to(at::kFloat);
  const int64_t in = x.size(1), width = g.size(1);
  std::vector<int64_t> index;
  std::vector<at::Tensor> values;
  for (const Segment& seg : Segments(rows, seq_len)) {
    const at::Tensor xs = x32.narrow(0, seg.begin, seg.count), gs = g32.narrow(0, seg.begin, seg.count);
    // Ghost form costs n²(in + out), the explicit gradient n·in·out: take the cheaper.
    const bool ghost = seg.count * (in + width) < in * width;
    values.push_back(ghost ? (at::mm(xs, xs.t()).to(at::kDouble) * at::mm(gs, gs.t()).to(at::kDouble)).sum()
                           : at::mm(gs.t(), xs).to(at::kDouble).pow(2).sum());
    index.push_back(seg.sequence);
  }
  out.index_add_(0, at::tensor(index, at::kLong).to(out.device()), at::stack(values).to(out.scalar_type()));
}

void AddRowNormsSq(const at::Tensor& x, const at::Tensor& g, int64_t seq_len, at::Tensor& out) {
  const int64_t b = out.size(0);
  const at::Tensor per_sequence = (x.to(at::kDouble) * g.to(at::kDouble).unsqueeze(1)).view({b, seq_len, -1}).sum(1);
  out.add_(per_sequence.pow(2).sum(1).to(out.scalar_type()));
}

void AddScalarNormsSq(const at::Tensor& g, int64_t seq_len, at::Tensor& out) {
  const int64_t b = out.size(0);
  out.add_(g.to(at::kDouble).view({b, seq_len}).sum(1).pow(2).to(out.scalar_type()));
}

at::Tensor ClipFactors(const at::Tensor& norms_sq, double max_grad_norm) {
  // c = min(1, C / ‖g‖); a zero gradient keeps c = 1.
  return at::clamp_max(max_grad_norm / norms_sq.sqrt().clamp_min(1e-30), 1.0);
}

void AddGaussianNoise(const std::vector<NamedTensor>& params, double std, uint64_t seed, int64_t step) {
  if (!(std > 0)) return;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i].tensor;
    at::Generator gen = at::detail::createCPUGenerator(StepSeed(seed, step, /*stream=*/2) + i);
    at::Tensor noise = at::normal(0.0, std, p.sizes(), gen, at::TensorOptions().dtype(at::kFloat)).to(p.device());
    if (p.grad().defined()) {
      p.mutable_grad().add_(noise);
    } else {
      p.mutable_grad() = noise;
    }
  }
}

}  // namespace flexfed
