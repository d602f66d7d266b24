#!/usr/bin/env bash
# The README's test command: installs what is missing (scripts/setup.sh), builds, runs every test
# that is not tagged slow. Works on a fresh Debian 12 machine. Extra arguments go to ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${FLEXFED_BUILD_DIR:-build}
ctest --test-dir "$build_dir" --output-on-failure -j "$(nproc)" -LE slow "$@"
