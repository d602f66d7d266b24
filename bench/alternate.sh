#!/usr/bin/env bash
# alternate.sh OUT "CPP COMMAND" "PYTHON COMMAND": runs the two sides of a benchmark A B A B,
# appending their JSON lines to OUT, so both see the same (noisy, shared) machine.
set -euo pipefail
out=$1 cpp=$2 py=$3
for round in 1 2; do
  echo "round $round/2: FlexFed" >&2
  eval "$cpp" >>"$out"
  echo "round $round/2: plain PyTorch" >&2
  eval "$py" >>"$out"
done
