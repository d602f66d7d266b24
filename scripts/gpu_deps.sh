#!/usr/bin/env bash
# Bundles the small libraries the GPU build mode needs besides CMake, nvcc and PyTorch (Abseil,
# nlohmann-json, CLI11, Catch2, OpenSSL's libcrypto, PCRE2, utf8proc, edlib, Gloo's headers: headers, CMake configs and libraries) from
# this Debian 12 machine into DIR (default .gpu-deps), for a GPU machine that can install nothing.
# The bundle is relocatable: scripts/gpu_build.sh uses it when FLEXFED_GPU_DEPS=DIR.
# Usage: scripts/gpu_deps.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu-deps}
bash scripts/setup.sh >/dev/null
rm -rf "$dir"
mkdir -p "$dir"
packages=(libabsl-dev libabsl20220623 nlohmann-json3-dev libcli11-dev catch2 libssl-dev libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2
  libedlib-dev libedlib1 libgloo-dev)
for p in "${packages[@]}"; do
  dpkg -L "$p" | while read -r f; do
    [[ $f == /usr/* && $f != /usr/share/doc/* && $f != /usr/share/man/* && ! -d $f ]] || continue
    mkdir -p "$dir$(dirname "$f")"
    cp -a "$f" "$dir$f"
  done
done
# OpenSSL's configuration headers live in the multiarch include folder, which only Debian's own
# compiler searches: put them beside the others.
cp -a /usr/include/x86_64-linux-gnu/openssl/. "$dir/usr/include/openssl/"
echo "bundled $(du -sh "$dir" | cut -f1) into $dir (carry it to the GPU machine; FLEXFED_GPU_DEPS=$dir)"
