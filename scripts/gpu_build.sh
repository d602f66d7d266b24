#!/usr/bin/env bash
# The build on a GPU machine: the same CMake build as everywhere, against that machine's own PyTorch
# (its LibTorch and CUDA), without the gRPC/SQLite services (a GPU machine that can install nothing
# lacks them). What it chooses: the interpreter and, where needed, the bundle of small libraries.
#   PYTHON=/path/to/python3   the Python whose PyTorch to use (default: python3 on PATH)
#   FLEXFED_GPU_DEPS=DIR      Abseil, nlohmann-json, CLI11, Catch2, OpenSSL from scripts/gpu_deps.sh
#   CUDA_ARCHS=90             CUDA architectures (default 90: H100/H200)
# The binaries find the bundle's libraries without LD_LIBRARY_PATH (RPATH; docs/GPU.md).
# Usage: scripts/gpu_build.sh [BUILD_DIR]   (default build-gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build-gpu}
python=$(command -v "${PYTHON:-python3}") || { echo "gpu_build: no ${PYTHON:-python3}; set PYTHON=/path/to/python3" >&2; exit 1; }
args=(-DFLEXFED_PYTHON="$python" -DFLEXFED_SERVICES=OFF -DFLEXFED_CUDA=ON -DFLEXFED_FUZZ=OFF
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}")
if [[ -n ${FLEXFED_GPU_DEPS:-} ]]; then
  deps=$(cd "$FLEXFED_GPU_DEPS" && pwd)/usr
  # DT_RPATH (not RUNPATH): it also serves the bundled libraries' own dependencies (Abseil's
  # libraries load each other), which a RUNPATH on the executable does not.
  args+=(-DCMAKE_PREFIX_PATH="$deps" -DOPENSSL_ROOT_DIR="$deps" -DOPENSSL_USE_STATIC_LIBS=TRUE
         -DCMAKE_EXE_LINKER_FLAGS=-Wl,--disable-new-dtags)
fi
command -v ninja >/dev/null && args+=(-G Ninja)
cmake -S . -B "$build_dir" "${args[@]}"
cmake --build "$build_dir" -j "$(nproc)" --target flexfed_tests flexfed_kernel_tests flexfed-owner flexfedctl \
  flexfed_kernel_bench flexfed_moe_bench flexfed_train_bench
