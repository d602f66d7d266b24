#!/usr/bin/env bash
# The GPU build mode: the model, the CUDA kernels, the tests, the owner's command and the benchmarks,
# against the CUDA LibTorch inside a PyTorch installation, without the services (gRPC, SQLite,
# prometheus: FLEXFED_SERVICES=OFF). Needs CMake, a C++17 compiler, nvcc and PyTorch with CUDA,
# plus Abseil, nlohmann-json, CLI11, Catch2 and OpenSSL: installed, or bundled by
# scripts/gpu_deps.sh on a Debian 12 machine and named by FLEXFED_GPU_DEPS=DIR.
# Usage: scripts/gpu_build.sh [BUILD_DIR]   (default build-gpu; CUDA_ARCHS defaults to 90)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build-gpu}
python=${PYTHON:-python3}
if ! torch_prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null); then
  echo "gpu_build: $python cannot import torch; install PyTorch with CUDA or set PYTHON=/path/to/python3" >&2
  exit 1
fi
if [[ $("$python" -c 'import torch; print(torch.version.cuda is not None)') != True ]]; then
  echo "gpu_build: $python's PyTorch has no CUDA; install a CUDA build of PyTorch" >&2
  exit 1
fi
nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[[ -x $nvcc ]] || { echo "gpu_build: no nvcc found; install the CUDA toolkit or set CUDACXX" >&2; exit 1; }
prefix=$torch_prefix
extra=()
if [[ -n ${FLEXFED_GPU_DEPS:-} ]]; then
  deps=$(cd "$FLEXFED_GPU_DEPS" && pwd)/usr
  prefix="$prefix;$deps"
  extra+=(-DOPENSSL_ROOT_DIR="$deps" -DOPENSSL_USE_STATIC_LIBS=TRUE)
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DFLEXFED_SERVICES=OFF -DFLEXFED_CUDA=ON \
  -DFLEXFED_FUZZ=OFF -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" \
  -DCMAKE_PREFIX_PATH="$prefix" -DFLEXFED_PYTHON="$(command -v "$python")" "${extra[@]}"
cmake --build "$build_dir" -j "$(nproc)" --target flexfed_tests flexfed_kernel_tests flexfed-owner flexfedctl \
  flexfed_kernel_bench flexfed_moe_bench flexfed_train_bench
