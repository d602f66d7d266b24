#!/usr/bin/env bash
# The reproduction run (issue #14; docs/EVALUATION.md, "The reproduction run"): FlexOlmo's claims at a
# scale where they can show, on the demo's domains.
#   1. set-up and build (scripts/build.sh);
#   2. the demo's domain text, with public text of tens of MB (fortunes + dict-gcide, from Debian);
#   3. a byte-level BPE tokenizer trained on the public text with the tokenizers library (8k words);
#   4. the public anchor: the `mini` shape (4 layers, hidden 128) on those tokens, for 20 tokens per
#      non-embedding parameter (Kaplan et al.'s count; the embeddings and LM head of an 8k vocabulary
#      would triple it, and the CPU budget with it) — resumable: interrupted (Ctrl-C, a reboot), the next run continues it;
#      then r_pub and its centers (router-init --public). Cached in the demo's cache, where
#      scripts/demo.sh then finds it ($cache/reproduction-anchor);
#   5. scripts/demo.sh on that anchor and the large data, owners and ablations trained for hundreds
#      of steps: federation, releases, ablations, the evaluation suite with intervals and the paper's
#      claims, into $FLEXFED_REPRO_DIR (default build/reproduce).
# Budget on a 2-core CPU (measured, docs/EVALUATION.md): a few hours, most of it the anchor; on a GPU
# machine, minutes. Settings: FLEXFED_REPRO_VOCAB, FLEXFED_REPRO_PRESET, FLEXFED_REPRO_TOKENS_PER_PARAM,
# FLEXFED_REPRO_ANCHOR_LR, FLEXFED_REPRO_EXPERT_STEPS, FLEXFED_REPRO_EXPERT_LR, FLEXFED_REPRO_THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
start_all=$SECONDS

vocab=${FLEXFED_REPRO_VOCAB:-8192}
preset=${FLEXFED_REPRO_PRESET:-mini}
tokens_per_param=${FLEXFED_REPRO_TOKENS_PER_PARAM:-20}
anchor_lr=${FLEXFED_REPRO_ANCHOR_LR:-3e-3}
expert_steps=${FLEXFED_REPRO_EXPERT_STEPS:-200}
expert_lr=${FLEXFED_REPRO_EXPERT_LR:-1e-3}
threads=${FLEXFED_REPRO_THREADS:-$(nproc)}
cache=${FLEXFED_DEMO_CACHE:-$HOME/.cache/flexfed-demo}
work=${FLEXFED_REPRO_DIR:-$repo/build/reproduce}
export FLEXFED_CACHE_DIR=$cache  # token cache: $cache/tokens

step() { printf '\n== reproduce: %s (%d s so far)\n' "$1" $((SECONDS - start_all)); }

step "set-up and build"
bash scripts/build.sh
build=$repo/${FLEXFED_BUILD_DIR:-build}
owner=$build/owner_client/flexfed-owner
python=$repo/.venv/bin/python

step "domain text, with tens of MB of public text"
bash scripts/demo/fetch_data.sh "$cache" large
data=$cache/data-large

step "BPE tokenizer on the public text (tokenizers, $vocab words)"
tok_key=$( (sha256sum "$data/public/train.jsonl" bench/reproduce/train_tokenizer.py | cut -d' ' -f1; echo "vocab=$vocab") | sha256sum | cut -c1-16)
tokenizer=$cache/tokenizer-$tok_key
if [[ -f $tokenizer/tokenizer.json ]]; then
  echo "reusing $tokenizer"
else
  rm -rf "$tokenizer.tmp"
  "$python" bench/reproduce/train_tokenizer.py --vocab "$vocab" --out "$tokenizer.tmp" "$data/public/train.jsonl"
  mv "$tokenizer.tmp" "$tokenizer"
fi

step "public anchor ($preset, BPE, $tokens_per_param tokens per non-embedding parameter)"
# The token budget from the model's non-embedding parameter count (attention, FFN, norms), counted
# on a random checkpoint of that shape and vocabulary (rows padded to 64, as pretraining pads them).
shape=$(mktemp -d)
"$build/ctl/flexfedctl" random-checkpoint --size "$preset" --tokenizer "$tokenizer" \
  --vocab-size $(((vocab + 63) / 64 * 64)) --dtype float32 --out "$shape/model" >/dev/null
params=$("$python" - "$shape/model" <<'PY'
import glob, sys
from safetensors import safe_open
total = embeddings = 0
for path in glob.glob(sys.argv[1] + "/*.safetensors"):
    with safe_open(path, "np") as f:
        for name in f.keys():
            n = f.get_slice(name).get_shape()
            count = 1
            for d in n:
                count *= d
            total += count
            embeddings += count if ("embed_tokens" in name or "lm_head" in name) else 0
print(total - embeddings, total)
PY
)
rm -rf "$shape"
read -r params all_params <<<"$params"
tokens=$((params * tokens_per_param))
anchor_key=$( (echo "$tok_key $preset tokens=$tokens lr=$anchor_lr recipe=1") | sha256sum | cut -c1-16)
anchor=$cache/anchor-bpe-$anchor_key
run=$cache/anchor-run-bpe-$anchor_key
echo "$preset: $params non-embedding parameters ($all_params in all) -> $tokens tokens ($((tokens / 4096)) steps of 4096;" \
  "$((tokens / all_params)) per parameter in all)"
if [[ -f $anchor/router_pub.safetensors ]]; then
  echo "reusing $anchor"
else
  train_args=(--seq-len 256 --batch-size 16 --val-every 0 --log-every 50 --checkpoint-every 200 --threads "$threads")
  if [[ -f $run/train_config.json ]]; then
    echo "continuing the interrupted pretraining in $run"
    "$owner" train --run "$run" --resume --threads "$threads"
  else
    "$owner" train --pretrain "$preset" --tokenizer "$tokenizer" --run "$run" --data "$data/public/train.jsonl" \
      --tokens "$tokens" --lr "$anchor_lr" --warmup 200 --min-lr-ratio 0.1 "${train_args[@]}"
  fi
  rm -rf "$anchor.tmp"
  cp -r "$run/model" "$anchor.tmp"
  "$owner" router-init --public --anchor "$anchor.tmp" --data "$data/public/train.jsonl" --samples 200 \
    --out "$anchor.tmp/router_pub.safetensors" --threads "$threads"
  mv "$anchor.tmp" "$anchor"
fi
ln -sfn "$anchor" "$cache/reproduction-anchor"

step "the federation, the ablations and the evaluation (scripts/demo.sh on this anchor)"
FLEXFED_DEMO_ANCHOR=$anchor FLEXFED_DEMO_DATA=large FLEXFED_DEMO_DIR=$work FLEXFED_DEMO_CACHE=$cache \
  FLEXFED_DEMO_EXPERT_STEPS=$expert_steps FLEXFED_DEMO_EXPERT_LR=$expert_lr FLEXFED_DEMO_EVAL_SEQUENCES=${FLEXFED_REPRO_EVAL_SEQUENCES:-64} \
  bash scripts/demo.sh
printf '\nreproduction finished in %d s: %s/results.json, %s/report.html\n' $((SECONDS - start_all)) "$work" "$work"
