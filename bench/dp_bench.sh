#!/usr/bin/env bash
# Data-parallel owner training on one machine: the same run (same global batch, same steps) as one
# process using every thread and as --nproc-per-node P processes sharing them, alternated A B A B;
# tokens/s from each run's metrics (every step after the first), best of the two rounds each.
# On a CPU the processes split the same cores, so the ratio is what the gradient all-reduce, the
# ZeRO-1 broadcasts and the smaller per-process products cost; on P GPUs it is the scaling. The P
# processes run twice: summing the gradients while the backward runs (the default) and after it.
# Usage: bench/dp_bench.sh [--preset small] [--processes 2] [--threads N] [--shape 4x512] [--steps 6] [--device cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=small processes=2 threads=$(nproc) shape=4x512 steps=6 device=cpu
while [[ $# -gt 0 ]]; do
  case $1 in
    --preset) preset=$2; shift 2 ;;
    --processes) processes=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --shape) shape=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    *) echo "dp_bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $shape =~ ^([0-9]+)x([0-9]+)$ ]] || { echo "dp_bench.sh: --shape must be BATCHxSEQ_LEN, e.g. 4x512" >&2; exit 2; }
batch=${BASH_REMATCH[1]} seq_len=${BASH_REMATCH[2]}
if (( batch % processes != 0 )); then
  echo "dp_bench.sh: the batch ($batch) must split evenly over $processes processes" >&2; exit 2
fi
per_process=$(( threads / processes > 0 ? threads / processes : 1 ))
build=${FLEXFED_BUILD:-build}
[[ -n ${FLEXFED_BUILD:-} ]] || bash scripts/build.sh >/dev/null
owner=$build/owner_client/flexfed-owner
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export FLEXFED_CACHE_DIR=$work/cache

# Seeded text: the public side and the owner's (enough sequences for every step of every run).
/usr/bin/python3 - "$work" <<'PY'
import random, sys
rng = random.Random(15)
words = ["data", "model", "expert", "router", "anchor", "token", "layer", "owner", "train", "merge", "query", "value"]
for name in ("public", "mine"):
    with open(f"{sys.argv[1]}/{name}.txt", "w") as f:
        for _ in range(4000):
            f.write(" ".join(rng.choice(words) for _ in range(60)) + ".\n")
PY
echo "building a $preset anchor" >&2
"$owner" train --pretrain "$preset" --data "$work/public.txt" --run "$work/anchor_run" --steps 1 --seq-len "$seq_len" \
  --batch-size 1 --warmup 1 --val-every 0 --device "$device" --threads "$threads" --plain >"$work/anchor.log" 2>&1
cp -r "$work/anchor_run/model" "$work/anchor"
"$owner" router-init --anchor "$work/anchor" --data "$work/public.txt" --public --out "$work/anchor/router_pub.safetensors" >/dev/null
"$owner" router-init --anchor "$work/anchor" --data "$work/mine.txt" --out "$work/r.safetensors" >/dev/null

run() {  # run NAME EXTRA-ARGS...: one training run; prints, over the steps after the first, its mean
         # tokens/s and the share of the step time spent communicating (0 on one process)
  local name=$1; shift
  "$owner" train --anchor "$work/anchor" --router-init "$work/r.safetensors" --data "$work/mine.txt" --run "$work/$name" \
    --steps "$steps" --seq-len "$seq_len" --batch-size "$batch" --warmup 1 --val-every 0 --val-batches 1 --log-every 1 \
    --device "$device" --plain "$@" >"$work/$name.log" 2>&1 || { cat "$work/$name.log" >&2; exit 1; }
  /usr/bin/python3 - "$work/$name/metrics.jsonl" "$(( batch * seq_len ))" <<'PY'
import json, sys
steps = [j for j in map(json.loads, open(sys.argv[1])) if "tokens_per_s" in j][1:]
rate = sum(j["tokens_per_s"] for j in steps) / len(steps)
seconds = sum(int(sys.argv[2]) / j["tokens_per_s"] for j in steps)
print(rate, sum(j.get("communication_s", 0) for j in steps) / seconds)
PY
}
one=0 many=0 share=0 after=0 after_share=0
for round in 1 2; do
  echo "round $round/2: 1 process × $threads threads" >&2
  read -r r _ < <(run "one_$round" --threads "$threads"); one=$(/usr/bin/python3 -c "print(max($one, $r))")
  echo "round $round/2: $processes processes × $per_process threads" >&2
  read -r r s < <(run "many_$round" --nproc-per-node "$processes" --threads "$per_process")
  if /usr/bin/python3 -c "import sys; sys.exit(0 if $r > $many else 1)"; then many=$r share=$s; fi
  echo "round $round/2: $processes processes × $per_process threads, gradients summed after the backward" >&2
  read -r r s < <(FLEXFED_GRADIENT_OVERLAP=off run "after_$round" --nproc-per-node "$processes" --threads "$per_process")
  if /usr/bin/python3 -c "import sys; sys.exit(0 if $r > $after else 1)"; then after=$r after_share=$s; fi
done
/usr/bin/python3 - "$preset" "$shape" "$threads" "$processes" "$per_process" "$one" "$many" "$share" "$after" "$after_share" <<'PY'
import sys
preset, shape, threads, processes, per_process = sys.argv[1:6]
one, many, share, after, after_share = (float(x) for x in sys.argv[6:])
print(f"{preset} expert step, {shape} tokens, same global batch:")
print(f"  1 process × {threads} threads: {one:.0f} tok/s")
print(f"  {processes} processes × {per_process} threads: {many:.0f} tok/s ({many / one:.2f}×), "
      f"{100 * share:.1f}% of the step waiting on the exchange (gradients summed during the backward)")
print(f"  {processes} processes × {per_process} threads: {after:.0f} tok/s ({after / one:.2f}×), "
      f"{100 * after_share:.1f}% (gradients summed after the backward, FLEXFED_GRADIENT_OVERLAP=off)")
PY
