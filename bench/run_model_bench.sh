#!/usr/bin/env bash
# Model benchmark: FlexFed (bench/model_bench.cpp) against the same model in plain PyTorch
# (bench/model_bench.py), same threads, alternated A B A B so both see the same machine; the best
# of each is compared. Prints a table; results go to docs/PERFORMANCE.md by hand.
# Usage: bench/run_model_bench.sh [--threads N] [--batch B] [--seq T]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
out=$(mktemp)
trap 'rm -f "$out"' EXIT
bench/alternate.sh "$out" "build/bench/flexfed_model_bench $*" ".venv/bin/python3 bench/model_bench.py $*"
/usr/bin/python3 - "$out" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    key = (d["bench"], d["model"], d["impl"])
    if key not in best or d["tokens_per_s"] > best[key]["tokens_per_s"]:
        best[key] = d
print(f"{'benchmark':<12}{'model':<11}{'FlexFed tok/s':>14}{'PyTorch tok/s':>14}{'ratio':>7}{'FlexFed/GEMM':>13}{'PyTorch/GEMM':>13}")
for bench, model in sorted({(b, m) for b, m, _ in best}, key=lambda x: (x[0] != "train_step", x[1])):
    f, p = best[(bench, model, "flexfed")], best[(bench, model, "python")]
    frac = lambda d: f"{d['gemm_fraction']:.0%}" if "gemm_fraction" in d else "-"
    print(f"{bench:<12}{model:<11}{f['tokens_per_s']:>14.0f}{p['tokens_per_s']:>14.0f}"
          f"{f['tokens_per_s'] / p['tokens_per_s']:>6.2f}x{frac(f):>13}{frac(p):>13}")
gemm = [d["gemm_flops_per_s"] for d in best.values() if "gemm_flops_per_s" in d]
print(f"fp32 GEMM rate measured in the same runs: {min(gemm) / 1e9:.0f}-{max(gemm) / 1e9:.0f} GFLOP/s")
PY
