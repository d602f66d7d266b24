#!/usr/bin/env bash
# Installs exactly what FlexFed's build, tests and demo need, from Debian 12 packages.
# Non-interactive and idempotent: when everything is present it only runs dpkg-query (well under 1 s).
set -euo pipefail

packages=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config clang libclang-rt-14-dev
  # LibTorch (CPU) and a fast BLAS for it
  libtorch-dev libopenblas0-openmp
  # services
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libssl-dev libsqlite3-dev prometheus-cpp-dev
  # libraries
  nlohmann-json3-dev libcli11-dev catch2
  # reference implementation and benchmarks (plain PyTorch)
  python3 python3-torch python3-numpy
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "installed" ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install packages: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
