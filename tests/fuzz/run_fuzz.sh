#!/usr/bin/env bash
# run_fuzz.sh FUZZER SEED_CORPUS RUNS: fuzzes from a scratch copy of the seed corpus (the seeds are
# never modified) for RUNS inputs with a fixed seed, so ctest runs are bounded and repeatable.
set -euo pipefail
fuzzer=$1 seeds=$2 runs=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$fuzzer" -runs="$runs" -seed=1 -max_len=4096 -artifact_prefix="$work/" "$work" "$seeds" 2>"$work/log" || {
  tail -40 "$work/log"
  echo "fuzz: $(basename "$fuzzer") failed on an input; the reproducer was printed above" >&2
  exit 1
}
grep -E "^Done|DONE" "$work/log" | tail -1
