#!/usr/bin/env bash
# Tokenizer benchmark: FlexFed's tokenizer.json BPE (bench/tokenizer_bench.cpp) against the
# tokenizers library (bench/tokenizer_bench.py) on the same file and corpus, alternated A B A B;
# best of each. The ids must agree (SHA-256 of all of them), or the comparison is void.
# Usage: bench/run_tokenizer_bench.sh [WORK_DIR]   (default build/tokenizer_bench; prepared once)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
work=${1:-build/tokenizer_bench}
[[ -f $work/tokenizer.json ]] || .venv/bin/python3 bench/tokenizer_bench.py prepare "$work"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in 1 2; do
  echo "round $round/2" >&2
  build/bench/flexfed_tokenizer_bench "$work" >>"$out"
  .venv/bin/python3 bench/tokenizer_bench.py measure "$work" >>"$out"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    k = (r["impl"], r["threads"])
    if k not in best or r["seconds"] < best[k]["seconds"]:
        best[k] = r
digests = {r["ids_sha256"] for r in rows}
if len(digests) != 1:
    sys.exit(f"the ids differ between FlexFed and tokenizers ({sorted(digests)}): the comparison is void")
hf = best[("tokenizers", 1)]
print(f"corpus: {hf['bytes'] / 1e6:.1f} MB, {hf['tokens']} tokens, identical ids (SHA-256 {hf['ids_sha256'][:16]}…)")
print(f"{'impl':<12}{'threads':>8}{'MB/s':>10}{'ratio':>9}")
for (impl, threads), r in sorted(best.items()):
    print(f"{impl:<12}{threads:>8}{r['mb_per_s']:>10.2f}{r['mb_per_s'] / hf['mb_per_s']:>8.2f}x")
PY
