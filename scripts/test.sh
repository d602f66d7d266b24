#!/usr/bin/env bash
# The README's test command: installs what is missing (scripts/setup.sh), builds, runs every test
# that is not tagged slow, then the sanitizer builds' service tests (scripts/sanitize.sh; skipped
# with FLEXFED_SANITIZERS=0 for a quick local run). Works on a fresh Debian 12 machine. Extra
# arguments go to the main ctest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${FLEXFED_BUILD_DIR:-build}
ctest --test-dir "$build_dir" --output-on-failure -j "$(nproc)" -LE slow "$@"
if [[ ${FLEXFED_SANITIZERS:-1} != 0 ]]; then
  bash scripts/sanitize.sh
fi
