#!/usr/bin/env bash
# Owner training-step benchmark: FlexFed's Trainer::Step (bench/train_bench.cpp) against the same
# step in plain PyTorch (bench/train_bench.py), same threads, alternated A B A B; best of each.
# Usage: bench/run_train_bench.sh [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
out=$(mktemp)
trap 'rm -f "$out"' EXIT
bench/alternate.sh "$out" "build/bench/flexfed_train_bench $*" ".venv/bin/python3 bench/train_bench.py $*"
/usr/bin/python3 - "$out" <<'PY'
import json, sys
best, peak, memory = {}, {}, None
for line in open(sys.argv[1]):
    d = json.loads(line)
    key = (d["tokens_per_step"], d["impl"])
    if key not in best or d["tokens_per_s"] > best[key]["tokens_per_s"]:
        best[key] = d
    peak[d["impl"]] = max(peak.get(d["impl"], 0), d["peak_rss_bytes"])
    memory = d.get("memory", memory)
print(f"{'tokens/step':<12}{'FlexFed tok/s':>14}{'PyTorch tok/s':>14}{'ratio':>7}{'FlexFed MFU':>12}")
for tokens in sorted({t for t, _ in best}, reverse=True):
    f, p = best[(tokens, "flexfed")], best[(tokens, "python")]
    print(f"{tokens:<12.0f}{f['tokens_per_s']:>14.0f}{p['tokens_per_s']:>14.0f}{f['tokens_per_s'] / p['tokens_per_s']:>6.2f}x{f['mfu']:>12.0%}")
mib = lambda b: f"{b / 2**20:.0f} MiB"
print("peak RSS (process, both step sizes): FlexFed", mib(peak["flexfed"]), "| PyTorch", mib(peak["python"]))
print("parts:", ", ".join(f"{k.replace('_', ' ')} {mib(v)}" for k, v in memory.items()))
PY
