// Every test case and every section starts LibTorch's default generator from a seed of its own
// name, so random inputs do not depend on which cases ran before (ctest runs groups with
// --order rand) and a failure reproduces when the case is run alone. Cases that need several
// independent draws still pass their own seeds (FlexOlmoModel::Create, at::manual_seed).
#define CATCH_CONFIG_EXTERNAL_INTERFACES  // TestEventListenerBase (Catch2 v2)
#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace flexfed::testing {
namespace {

uint64_t Fnv1a(const std::string& text) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ull;
  return h;
}

class SeedEachTest : public Catch::TestEventListenerBase {
 public:
  using TestEventListenerBase::TestEventListenerBase;
  void testCaseStarting(const Catch::TestCaseInfo& info) override {
    TestEventListenerBase::testCaseStarting(info);
    at::manual_seed(Fnv1a(info.name));
  }
  void sectionStarting(const Catch::SectionInfo& info) override {
    TestEventListenerBase::sectionStarting(info);
    at::manual_seed(Fnv1a(info.name));
  }
};
CATCH_REGISTER_LISTENER(SeedEachTest)

}  // namespace
}  // namespace flexfed::testing
