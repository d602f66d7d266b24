#!/usr/bin/env bash
# Configures and builds FlexFed into build/ (or $FLEXFED_BUILD_DIR) after installing what it needs.
# Extra arguments go to the CMake configure step, e.g. -DFLEXFED_SERVICES=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
build_dir=${FLEXFED_BUILD_DIR:-build}
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
if [[ ! -f "$build_dir/build.ninja" ]] || (($# > 0)); then
  cmake -S . -B "$build_dir" -G Ninja "$@"
fi
cmake --build "$build_dir" -j "$(nproc)"
