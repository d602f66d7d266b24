// Privacy accounting for DP-SGD with Poisson sampling (docs/PRIVACY.md): the Rényi differential
// privacy (RDP) of the sampled Gaussian mechanism (Mironov, Talwar and Zhang, 2019), composed over
// steps, and converted to (ε, δ) with the conversion of Balle et al. (2020, Prop. 12). Neighbouring
// data sets differ by adding or removing one training sequence. Torch-free.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

// The RDP orders ε is minimised over: 1.1 … 10.9 by 0.1, 11 … 63, 128, 256, 512, 1024 (a common set,
// dense where Gaussian mechanisms in the useful regime have their optimum).
std::vector<double> DefaultRdpOrders();

// RDP at `order` (> 1) of one step of the Gaussian mechanism with noise multiplier `sigma` (noise
// standard deviation / clipping norm) on a Poisson sample where each record is included with
// probability `q`. 0 when q = 0; +inf when sigma = 0 (no noise), or where the series does not converge.
double SampledGaussianRdp(double q, double sigma, double order);

// The smallest ε over `orders` for which composing the RDP values `rdp` gives (ε, δ)-DP, and the
// order that achieves it. δ in (0, 1).
struct EpsilonAtOrder {
  double epsilon = 0;
  double order = 0;
};
EpsilonAtOrder RdpToEpsilon(const std::vector<double>& orders, const std::vector<double>& rdp, double delta);

// Accumulates the privacy spent by DP-SGD steps. Cheap to copy; not thread-safe.
class RdpAccountant {
 public:
  explicit RdpAccountant(std::vector<double> orders = DefaultRdpOrders());

  // `steps` steps of the sampled Gaussian mechanism (sampling rate q, noise multiplier sigma).
  void Compose(double q, double sigma, int64_t steps);
  EpsilonAtOrder Epsilon(double delta) const;

  const std::vector<double>& orders() const { return orders_; }
  const std::vector<double>& rdp() const { return rdp_; }

 private:
  std::vector<double> orders_;
  std::vector<double> rdp_;  // per order, summed over the composed steps
};

// The smallest noise multiplier (to 0.1% relative) for which `steps` steps at sampling rate `q`
// stay within (epsilon, delta). InvalidArgument names the setting when the arguments are out of
// range or no multiplier up to 1e4 reaches epsilon.
absl::StatusOr<double> NoiseMultiplierForEpsilon(double epsilon, double delta, double q, int64_t steps);

}  // namespace flexfed
