#include "common/core/dp_accountant.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_format.h"

namespace flexfed {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b)).
double LogAdd(double a, double b) {
  if (a < b) std::swap(a, b);
  if (b == -kInf) return a;
  return a + std::log1p(std::exp(b - a));
}

// log |binomial(n, k)| for real n (its sign alternates once k > n for a fractional n; the series
// below takes magnitudes, as the derivation does).
double LogBinomial(double n, double k) { return std::lgamma(n + 1) - std::lgamma(k + 1) - std::lgamma(n - k + 1); }

// log(erfc(x)), accurate where erfc(x) itself underflows: past x = 25 the asymptotic expansion
// erfc(x) = exp(−x²)/(x√π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) + …), whose next term is < 1e-10 there.
double LogErfc(double x) {
  if (x < 25) return std::log(std::erfc(x));
  const double u = 1 / (x * x);
  return -x * x - std::log(x) - 0.5 * std::log(M_PI) + std::log1p(u * (-0.5 + u * (0.75 - u * 1.875)));
}

// log A_α for an integer order: the binomial expansion of E[(p_mix / p_0)^α] (Mironov et al. §3.2).
double LogAInteger(double q, double sigma, int64_t alpha) {
  double log_a = -kInf;
  const double log_q = std::log(q), log_1mq = std::log1p(-q);
  for (int64_t i = 0; i <= alpha; ++i) {
    const double di = static_cast<double>(i);
    log_a = LogAdd(log_a, LogBinomial(static_cast<double>(alpha), di) + di * log_q +
                              (static_cast<double>(alpha) - di) * log_1mq + (di * di - di) / (2 * sigma * sigma));
  }
  return log_a;
}

// log A_α for a fractional order: the integral split at z0 where the two densities cross, each part
// a series summed until its terms fall 30 nats below the total (Mironov et al. §3.3).
double LogAFractional(double q, double sigma, double alpha) {
  constexpr int kMaxTerms = 1000;
  const double log_q = std::log(q), log_1mq = std::log1p(-q);
  const double z0 = sigma * sigma * std::log(1 / q - 1) + 0.5;
  double log_a0 = -kInf, log_a1 = -kInf, last_s0 = -kInf, last_s1 = -kInf;
  for (int i = 0; i < kMaxTerms; ++i) {
    const double coef = LogBinomial(alpha, i);
    const double j = alpha - i;
    const double s0 = coef + i * log_q + j * log_1mq + (i * static_cast<double>(i) - i) / (2 * sigma * sigma) +
                      std::log(0.5) + LogErfc((i - z0) / (M_SQRT2 * sigma));
    const double s1 = coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma * sigma) + std::log(0.5) +
                      LogErfc((z0 - j) / (M_SQRT2 * sigma));
    log_a0 = LogAdd(log_a0, s0);
    log_a1 = LogAdd(log_a1, s1);
    const double total = LogAdd(log_a0, log_a1);
    if (s0 < last_s0 && s1 < last_s1 && std::max(s0, s1) < total - 30) return total;
    last_s0 = s0;
    last_s1 = s1;
  }
  return kInf;  // did not converge: this order gives no bound
}

}  // namespace

std::vector<double> DefaultRdpOrders() {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1 + x / 10.0);
  for (int a = 11; a < 64; ++a) orders.push_back(a);
  for (double a : {128.0, 256.0, 512.0, 1024.0}) orders.push_back(a);
  return orders;
}

double SampledGaussianRdp(double q, double sigma, double order) {
  if (q == 0) return 0;
  if (sigma == 0 || std::isinf(order)) return kInf;
  if (q == 1) return order / (2 * sigma * sigma);
  const double log_a = order == std::floor(order) ? LogAInteger(q, sigma, static_cast<int64_t>(order))
                                                  : LogAFractional(q, sigma, order);
  return log_a / (order - 1);
}

EpsilonAtOrder RdpToEpsilon(const std::vector<double>& orders, const std::vector<double>& rdp, double delta) {
  EpsilonAtOrder best{kInf, orders.empty() ? 0 : orders[0]};
  for (size_t i = 0; i < orders.size() && i < rdp.size(); ++i) {
    const double a = orders[i], r = rdp[i];
    double epsilon;
    if (r < 0) {
      epsilon = 0;  // numerically negative divergence: no privacy spent
    } else if (delta * delta + std::expm1(-r) > 0) {
      epsilon = 0;  // already implied by the KL bound δ ≤ sqrt(1 − exp(−KL))
    } else if (a > 1.01) {
      // Balle et al. 2020, Prop. 12 (unstable as a → 1, and never the best order there).
      epsilon = r + std::log1p(-1 / a) - std::log(delta * a) / (a - 1);
    } else {
      epsilon = kInf;
    }
    if (epsilon < best.epsilon) best = {epsilon, a};
  }
  best.epsilon = std::max(0.0, best.epsilon);
  return best;
}

RdpAccountant::RdpAccountant(std::vector<double> orders) : orders_(std::move(orders)), rdp_(orders_.size(), 0.0) {}

void RdpAccountant::Compose(double q, double sigma, int64_t steps) {
  if (steps <= 0) return;
  for (size_t i = 0; i < orders_.size(); ++i) rdp_[i] += steps * SampledGaussianRdp(q, sigma, orders_[i]);
}

EpsilonAtOrder RdpAccountant::Epsilon(double delta) const { return RdpToEpsilon(orders_, rdp_, delta); }

absl::StatusOr<double> NoiseMultiplierForEpsilon(double epsilon, double delta, double q, int64_t steps) {
  if (!(epsilon > 0) || !std::isfinite(epsilon))
    return absl::InvalidArgumentError(absl::StrFormat("--dp-epsilon %g: give a positive number", epsilon));
  if (!(delta > 0 && delta < 1))
    return absl::InvalidArgumentError(absl::StrFormat("--dp-delta %g: give a number in (0, 1), e.g. 1e-5", delta));
  if (!(q > 0 && q <= 1))
    return absl::InvalidArgumentError(absl::StrFormat("sampling rate %g: must be in (0, 1]", q));
  if (steps < 1) return absl::InvalidArgumentError("steps: at least one step is needed to solve for the noise");
  auto epsilon_at = [&](double sigma) {
    RdpAccountant accountant;
    accountant.Compose(q, sigma, steps);
    return accountant.Epsilon(delta).epsilon;
  };
  constexpr double kMaxSigma = 1e4;
  double hi = 1;
  while (epsilon_at(hi) > epsilon) {
    hi *= 2;
    if (hi > kMaxSigma)
      return absl::InvalidArgumentError(absl::StrFormat(
          "no noise multiplier up to %g keeps %d steps at sampling rate %g within ε = %g, δ = %g: allow a larger ε "
          "or train fewer steps",
          kMaxSigma, steps, q, epsilon, delta));
  }
  double lo = hi / 2;
  while (lo > 1e-3 && epsilon_at(lo) <= epsilon) lo /= 2;
  while ((hi - lo) > 1e-3 * hi) {
    const double mid = 0.5 * (lo + hi);
    (epsilon_at(mid) <= epsilon ? hi : lo) = mid;
  }
  return hi;
}

}  // namespace flexfed
