#!/usr/bin/env bash
# The sanitizer builds of the torch-free half (docs/BUILD.md, "Sanitizers"): core, protocol, client
# and coordinator with their tests, built without LibTorch into build-asan/ (AddressSanitizer +
# UndefinedBehaviorSanitizer) and build-tsan/ (ThreadSanitizer), each running the service tests.
# Any report fails the run (-fno-sanitize-recover, halt_on_error). scripts/test.sh calls it after
# the main tests; run it alone after scripts/setup.sh.
#   scripts/sanitize.sh [asan|tsan ...]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
kinds=("$@")
((${#kinds[@]})) || kinds=(asan tsan)
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
root=$PWD
for kind in "${kinds[@]}"; do
  case $kind in
    asan) flags=address,undefined ;;
    tsan) flags=thread ;;
    *) echo "sanitize.sh: unknown sanitizer '$kind'; give asan or tsan" >&2; exit 2 ;;
  esac
  dir=${FLEXFED_SANITIZE_DIR:-build}-$kind
  echo "== $kind: building the torch-free half into $dir"
  if [[ ! -f "$dir/build.ninja" ]]; then
    cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFLEXFED_TORCH=OFF -DFLEXFED_FUZZ=OFF \
      -DFLEXFED_SANITIZE="$flags" >/dev/null
  fi
  cmake --build "$dir" -j "$(nproc)" --target flexfed_service_tests
  echo "== $kind: the service tests"
  # Leaks are checked too (ASan's LeakSanitizer); TSan reports stop the process at the first.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  TSAN_OPTIONS="suppressions=$root/tests/sanitizers/tsan.supp halt_on_error=1 report_signal_unsafe=0 second_deadlock_stack=1" \
    ctest --test-dir "$dir" --output-on-failure -j "$(nproc)" -LE slow
done
