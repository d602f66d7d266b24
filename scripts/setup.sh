#!/usr/bin/env bash
# Installs exactly what FlexFed's build, tests and demo need: Debian 12 packages, and the project's
# Python environment .venv with LibTorch (PyTorch's CUDA build), the CUDA compiler it was built with
# and the test oracles, pinned in scripts/python-requirements.txt. Non-interactive and idempotent:
# when everything is there it runs dpkg-query and compares one stamp file (well under 1 s).
# FLEXFED_VENV=DIR puts the environment elsewhere (the build then needs -DFLEXFED_PYTHON=DIR/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config clang libclang-rt-14-dev
  # services
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libssl-dev libsqlite3-dev prometheus-cpp-dev
  # libraries
  nlohmann-json3-dev libcli11-dev catch2
  # tokenizers: Unicode regular expressions (pre-tokenizers) and normalization (NFC)
  libpcre2-dev libutf8proc-dev
  # the extraction audit's edit distance
  libedlib-dev
  # Gloo's headers, which LibTorch's c10d ProcessGroupGloo header includes (data-parallel training;
  # the Gloo code itself is LibTorch's own)
  libgloo-dev
  # the Python environment (LibTorch, the test oracles, benchmarks' peers)
  python3 python3-venv
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "installed" ]] || missing+=("$p")
done

if ((${#missing[@]} > 0)); then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install packages: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "setup: Debian packages done"
fi

# The Python environment, from Debian's python3 (not whatever python3 comes first on PATH). The stamp
# holds the requirements it was made from: a changed pin re-installs, an unchanged one costs a cmp.
venv=${FLEXFED_VENV:-.venv}
requirements=scripts/python-requirements.txt
if ! cmp -s "$requirements" "$venv/.flexfed-requirements" 2>/dev/null; then
  echo "setup: installing the Python environment $venv ($(grep -v '^#' "$requirements" | tr '\n' ' '))"
  [[ -x $venv/bin/python3 ]] || /usr/bin/python3 -m venv "$venv"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check --requirement "$requirements"
  # NVIDIA's wheels hold a complete CUDA toolkit (nvcc, headers, libraries) in nvidia/cu13, laid out
  # as nvcc's own profile and CMake expect it but for two things: the libraries are in lib/ (nvcc
  # links from lib64/) and carry only versioned names (CMake finds libcudart.so). Add both as links.
  cuda_root=$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13
  if [[ -x $cuda_root/bin/nvcc ]]; then
    ln -sfn lib "$cuda_root/lib64"
    for lib in "$cuda_root"/lib/lib*.so.*; do
      ln -sf "$(basename "$lib")" "$cuda_root/lib/$(basename "${lib%%.so.*}").so"
    done
  fi
  cp "$requirements" "$venv/.flexfed-requirements"
  echo "setup: Python environment done"
fi
