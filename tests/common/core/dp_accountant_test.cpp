// Specification of the privacy accountant (common/core/dp_accountant.h): the same RDP and (ε, δ) as
// Google's dp-accounting library (tests/oracle/dp_accounting_cases.py, run by ctest first).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "common/core/dp_accountant.h"

namespace flexfed {
namespace {

nlohmann::json OracleCases() {
  const char* dir = std::getenv("FLEXFED_DP_ORACLE_DIR");
  if (dir == nullptr) throw std::runtime_error("set FLEXFED_DP_ORACLE_DIR to build/oracle_dp (ctest does)");
  std::ifstream in(std::string(dir) + "/cases.json");
  if (!in) throw std::runtime_error(std::string("no ") + dir + "/cases.json: run tests/oracle/dp_accounting_cases.py");
  return nlohmann::json::parse(in);
}

double Relative(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }

TEST_CASE("the accountant's RDP and epsilon equal dp-accounting's", "[privacy]") {
  const nlohmann::json oracle = OracleCases();
  REQUIRE(oracle.at("cases").size() >= 5);
  for (const auto& c : oracle.at("cases")) {
    const double q = c.at("q"), sigma = c.at("sigma"), delta = c.at("delta");
    const int64_t steps = c.at("steps");
    CAPTURE(oracle.at("library").get<std::string>(), q, sigma, steps, delta);
    RdpAccountant accountant;
    REQUIRE(accountant.orders() == c.at("orders").get<std::vector<double>>());
    accountant.Compose(q, sigma, steps);
    for (size_t i = 0; i < accountant.orders().size(); ++i) {
      CAPTURE(accountant.orders()[i]);
      const nlohmann::json& expected = c.at("rdp")[i];
      if (expected.is_null()) {
        CHECK(std::isinf(accountant.rdp()[i]));  // the series did not converge there either
      } else {
        // 1e-8: at low orders and tiny q the RDP (~1e-8 nats a step) is a log of a sum that nearly
        // cancels, where two correct implementations differ in the ninth digit.
        CHECK(Relative(accountant.rdp()[i], expected.get<double>()) < 1e-8);
      }
    }
    const EpsilonAtOrder got = accountant.Epsilon(delta);
    CHECK(Relative(got.epsilon, c.at("epsilon").get<double>()) < 1e-9);
    CHECK(got.order == c.at("order").get<double>());
  }
}

TEST_CASE("composition adds: n steps at once equal n single steps", "[privacy]") {
  RdpAccountant once, stepwise;
  once.Compose(0.02, 1.3, 300);
  for (int i = 0; i < 300; ++i) stepwise.Compose(0.02, 1.3, 1);
  for (size_t i = 0; i < once.rdp().size(); ++i) CHECK(Relative(stepwise.rdp()[i], once.rdp()[i]) < 1e-12);
  CHECK(Relative(stepwise.Epsilon(1e-5).epsilon, once.Epsilon(1e-5).epsilon) < 1e-12);
}

TEST_CASE("no sampling spends nothing; no noise gives no guarantee", "[privacy]") {
  RdpAccountant nothing;
  nothing.Compose(/*q=*/0, /*sigma=*/1, 1000);
  CHECK(nothing.Epsilon(1e-5).epsilon == 0);
  RdpAccountant no_noise;
  no_noise.Compose(/*q=*/0.01, /*sigma=*/0, 1);
  CHECK(std::isinf(no_noise.Epsilon(1e-5).epsilon));
  // Full batches: the Gaussian mechanism's RDP α / (2σ²), exactly.
  CHECK(SampledGaussianRdp(1.0, 2.0, 8.0) == 1.0);
}

TEST_CASE("epsilon falls with more noise and rises with more steps", "[privacy]") {
  auto epsilon = [](double sigma, int64_t steps) {
    RdpAccountant a;
    a.Compose(0.01, sigma, steps);
    return a.Epsilon(1e-5).epsilon;
  };
  CHECK(epsilon(0.8, 1000) > epsilon(1.0, 1000));
  CHECK(epsilon(1.0, 1000) > epsilon(2.0, 1000));
  CHECK(epsilon(1.0, 2000) > epsilon(1.0, 1000));
}

TEST_CASE("the noise multiplier solved for a target epsilon is the smallest that meets it", "[privacy]") {
  for (double target : {0.5, 2.0, 8.0}) {
    CAPTURE(target);
    const double q = 0.01, delta = 1e-5;
    const int64_t steps = 1500;
    absl::StatusOr<double> sigma = NoiseMultiplierForEpsilon(target, delta, q, steps);
    REQUIRE(sigma.ok());
    RdpAccountant at, below;
    at.Compose(q, *sigma, steps);
    below.Compose(q, *sigma * 0.998, steps);
    CHECK(at.Epsilon(delta).epsilon <= target);
    CHECK(below.Epsilon(delta).epsilon > target);
  }
}

TEST_CASE("impossible or malformed privacy targets are refused with the setting named", "[privacy]") {
  CHECK(NoiseMultiplierForEpsilon(0, 1e-5, 0.01, 100).status().message().find("--dp-epsilon") != std::string::npos);
  CHECK(NoiseMultiplierForEpsilon(1, 0, 0.01, 100).status().message().find("--dp-delta") != std::string::npos);
  CHECK(NoiseMultiplierForEpsilon(1, 1e-5, 0, 100).status().code() == absl::StatusCode::kInvalidArgument);
  // δ smaller than any mechanism can reach with ε = 1e-9 at full batches.
  CHECK(!NoiseMultiplierForEpsilon(1e-9, 1e-5, 1.0, 1000000).ok());
}

}  // namespace
}  // namespace flexfed
