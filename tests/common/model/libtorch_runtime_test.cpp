// How a LibTorch-linked process behaves beyond the tensors: regression tests for the pitfalls of
// linking PyTorch's own LibTorch (cmake/FlexFedTorch.cmake).
#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <system_error>

#include "tests/temp_dir.h"

namespace fs = std::filesystem;

// PyTorch's libtorch.so exports copies of std::filesystem built with a newer GCC; linked ahead of
// libstdc++, fs::remove_all bound to them and jumped to address 0 (every TempDir's destructor, and
// the GPU train bench at exit, crashed). Both overloads, on a tree with files and a symlink.
TEST_CASE("a LibTorch process removes directory trees with std::filesystem", "[model]") {
  const at::Tensor t = at::ones({2});  // this process really uses LibTorch
  REQUIRE(t.sum().item<float>() == 2.0f);
  for (const bool with_error_code : {false, true}) {
    flexfed::testing::TempDir dir;
    const fs::path root = dir / "tree";
    fs::create_directories(root / "a" / "b");
    std::ofstream(root / "a" / "b" / "f.bin") << "x";
    std::ofstream(root / "top.txt") << "y";
    fs::create_symlink(root / "top.txt", root / "a" / "link");
    if (with_error_code) {
      std::error_code ec;
      CHECK(fs::remove_all(root, ec) == 6);
      CHECK(!ec);
    } else {
      CHECK(fs::remove_all(root) == 6);
    }
    CHECK(!fs::exists(root));
  }
}
