#!/usr/bin/env bash
# The privacy table of docs/EVALUATION.md ("Extraction and differential privacy"): how much of one
# owner's training data each model reproduces, and what differential privacy costs in quality.
#
# One owner's domain (default math) with planted canaries — random records no model can guess,
# 4 of them at each repetition count (FLEXFED_PRIVACY_REPEATS, default 1 16 128 1024) in the owner's
# training data — and five models:
#   public     the anchor (never saw the data)
#   dense      the anchor's FFNs trained densely on the owner's data (`train --dense`)
#   flexolmo   the owner's two-expert model (public + its expert, `train`)
#   dp-eps-E   the same expert trained with DP-SGD at each ε of FLEXFED_PRIVACY_EPSILONS
# Each is audited (`flexfed-owner audit`, paper settings: 32-token prefix, up to 256 generated
# tokens, similarity >= 0.9) on a sample of the real training documents and on every canary, and
# scored in bits per byte on the domain's held-out text (and the public held-out text).
# Resumable: a finished step is skipped when run again; interrupted training resumes.
#
# Needs a built tree (scripts/build.sh) and the demo's anchor and data: by default the reproduction
# run's anchor (bench/reproduce.sh) and its data (scripts/demo/fetch_data.sh CACHE large).
# Settings: FLEXFED_PRIVACY_ANCHOR, FLEXFED_PRIVACY_DATA, FLEXFED_PRIVACY_DOMAIN, FLEXFED_PRIVACY_DIR,
# FLEXFED_PRIVACY_STEPS (200), FLEXFED_PRIVACY_SAMPLES (audited training documents, 100),
# FLEXFED_PRIVACY_EPSILONS ("8 1"), FLEXFED_PRIVACY_CLIP (C, 1.0), FLEXFED_PRIVACY_THREADS (nproc),
# FLEXFED_PRIVACY_REPEATS ("1 16 128 1024").
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build=${FLEXFED_BUILD_DIR:-$repo/build}
owner=$build/owner_client/flexfed-owner
cache=${FLEXFED_DEMO_CACHE:-$HOME/.cache/flexfed-demo}
anchor=${FLEXFED_PRIVACY_ANCHOR:-$cache/reproduction-anchor}
data=${FLEXFED_PRIVACY_DATA:-$cache/data-large}
domain=${FLEXFED_PRIVACY_DOMAIN:-math}
work=${FLEXFED_PRIVACY_DIR:-$build/privacy-$domain}
steps=${FLEXFED_PRIVACY_STEPS:-200}
samples=${FLEXFED_PRIVACY_SAMPLES:-100}
read -r -a epsilons <<<"${FLEXFED_PRIVACY_EPSILONS:-8 1}"
read -r -a repeats <<<"${FLEXFED_PRIVACY_REPEATS:-1 16 128 1024}"
clip=${FLEXFED_PRIVACY_CLIP:-1.0}
threads=${FLEXFED_PRIVACY_THREADS:-$(nproc)}
export FLEXFED_CACHE_DIR=${FLEXFED_CACHE_DIR:-$cache/tokens}

[[ -x $owner ]] || { echo "privacy_table: $owner is missing; build first (bash scripts/build.sh)" >&2; exit 1; }
[[ -f $anchor/config.json ]] || { echo "privacy_table: no anchor at $anchor; run bench/reproduce.sh or set FLEXFED_PRIVACY_ANCHOR" >&2; exit 1; }
for f in "$data/$domain/train.jsonl" "$data/$domain/heldout.jsonl" "$data/public/train.jsonl" "$data/public/heldout.jsonl"; do
  [[ -f $f ]] || { echo "privacy_table: $f is missing; run scripts/demo/fetch_data.sh $cache large or set FLEXFED_PRIVACY_DATA" >&2; exit 1; }
done
mkdir -p "$work"
log() { printf '[privacy %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$SECONDS

# 1. The owner's data with canaries: 4 canaries per repetition count, each a random record (a
#    12-digit code and 24 words drawn from 64) that only memorisation can reproduce; shuffled into
#    the real documents with a fixed seed. canaries-rR.jsonl holds each group once, for the audit.
if [[ ! -f $work/data/train.jsonl ]]; then
  mkdir -p "$work/data.tmp"
  /usr/bin/python3 - "$data/$domain/train.jsonl" "$work/data.tmp" "${repeats[*]}" <<'PY'
import json, random, sys
source, out, repeat_counts = sys.argv[1], sys.argv[2], [int(r) for r in sys.argv[3].split()]
rng = random.Random(20261204)
words = ("amber basalt cobalt dune ember fjord garnet harbor indigo juniper kestrel lagoon meadow nickel "
         "onyx pewter quartz russet saffron tundra umber violet willow xenon yarrow zinnia anchor beacon "
         "canyon delta estuary falcon glacier heron island jasper kelp lantern marble nectar orchid prairie "
         "quill raven sierra thistle upland valley walnut yonder zephyr acorn birch cedar dahlia elm fern "
         "grove hazel iris larch lotus maple poplar").split()
assert len(words) == 64
docs = [json.loads(line)["text"] for line in open(source, encoding="utf-8") if line.strip()]
groups = {}
for repeats in repeat_counts:
    group = []
    for k in range(4):
        code = "".join(rng.choice("0123456789") for _ in range(12))
        phrase = " ".join(rng.choice(words) for _ in range(24))
        group.append(f"Private record {code} (copies {repeats}, canary {k}): {phrase}.\n")
    groups[repeats] = group
    with open(f"{out}/canaries-r{repeats}.jsonl", "w", encoding="utf-8") as f:
        for text in group:
            f.write(json.dumps({"text": text}) + "\n")
    docs += [text for text in group for _ in range(repeats)]
rng.shuffle(docs)
with open(f"{out}/train.jsonl", "w", encoding="utf-8") as f:
    for text in docs:
        f.write(json.dumps({"text": text}) + "\n")
PY
  rm -rf "$work/data" && mv "$work/data.tmp" "$work/data"
fi
train_data=$work/data/train.jsonl
log "data: $(wc -l <"$train_data") documents in $train_data (canaries in $work/data/canaries-r*.jsonl)"

# 2. The models. Same recipe as the reproduction's owners: seq 256, batch 16, lr 1e-3, 5 warm-up steps.
common=(--anchor "$anchor" --data "$train_data" --steps "$steps" --lr 1e-3 --warmup 5 --seq-len 256 --batch-size 16
  --val-every 0 --log-every 20 --checkpoint-every 50 --plain --threads "$threads")
if [[ ! -f $work/router.safetensors ]]; then
  "$owner" router-init --anchor "$anchor" --data "$train_data" --samples 200 --public-data "$data/public/train.jsonl" \
    --public-share 0.05 --out "$work/router.safetensors" --threads "$threads"
fi
train() {  # NAME ARGS...: trains into $work/NAME unless its model exists; resumes an interrupted run
  local name=$1; shift
  [[ -f $work/$name/model/config.json ]] && return 0
  local resume=()
  [[ -f $work/$name/config.json ]] && resume=(--resume)
  log "training $name"
  local t=$SECONDS
  "$owner" train --run "$work/$name" "${common[@]}" "${resume[@]}" "$@"
  echo $((SECONDS - t)) >"$work/$name/train_seconds"
}
train flexolmo --router-init "$work/router.safetensors"
train dense --dense
for e in "${epsilons[@]}"; do
  train "dp-eps-$e" --router-init "$work/router.safetensors" --dp-epsilon "$e" --dp-delta 1e-5 --dp-max-grad-norm "$clip"
done

# 3. Audits and bits per byte.
models=(public "$anchor" flexolmo "$work/flexolmo/model" dense "$work/dense/model")
for e in "${epsilons[@]}"; do models+=("dp-eps-$e" "$work/dp-eps-$e/model"); done
mkdir -p "$work/results"
for ((i = 0; i < ${#models[@]}; i += 2)); do
  name=${models[i]} model=${models[i + 1]} out=$work/results/$name
  mkdir -p "$out"
  if [[ ! -f $out/eval.json ]]; then
    log "bits per byte: $name"
    "$owner" eval "$model" --data "$data/$domain/heldout.jsonl" --seq-len 256 --max-sequences 64 --threads "$threads" --json >"$out/eval.tmp"
    mv "$out/eval.tmp" "$out/eval.json"
  fi
  if [[ ! -f $out/eval-public.json ]]; then
    "$owner" eval "$model" --data "$data/public/heldout.jsonl" --seq-len 256 --max-sequences 64 --threads "$threads" --json >"$out/eval.tmp"
    mv "$out/eval.tmp" "$out/eval-public.json"
  fi
  audit=(--model "$model" --threads "$threads" --plain --json --show 0)
  if [[ ! -f $out/train-docs.json ]]; then
    log "audit of $samples training documents: $name"
    "$owner" audit "${audit[@]}" --data "$data/$domain/train.jsonl" --samples "$samples" --out "$out/audit-train" >"$out/audit.tmp"
    mv "$out/audit.tmp" "$out/train-docs.json"
  fi
  for r in "${repeats[@]}"; do
    if [[ ! -f $out/canaries-r$r.json ]]; then
      "$owner" audit "${audit[@]}" --data "$work/data/canaries-r$r.jsonl" --samples 4 --min-continuation-tokens 16 \
        --out "$out/audit-canaries-r$r" >"$out/audit.tmp"
      mv "$out/audit.tmp" "$out/canaries-r$r.json"
    fi
  done
done

# 4. The table.
/usr/bin/python3 - "$work" "${epsilons[*]}" "${repeats[*]}" <<'PY'
import json, os, sys
work, epsilons, repeat_counts = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
names = ["public", "dense", "flexolmo"] + [f"dp-eps-{e}" for e in epsilons]
rows = []
print(f"| model | ε (δ = 1e-5) | training docs extracted | mean similarity | canaries extracted {' / '.join('×' + r for r in repeat_counts)} | bits/byte domain | bits/byte public | training s |")
print("|---|---|---|---|---|---|---|---|")
for name in names:
    out = os.path.join(work, "results", name)
    docs = json.load(open(f"{out}/train-docs.json"))
    canaries = [json.load(open(f"{out}/canaries-r{r}.json")) for r in repeat_counts]
    bpb = json.load(open(f"{out}/eval.json"))["bits_per_byte"]
    bpb_public = json.load(open(f"{out}/eval-public.json"))["bits_per_byte"]
    epsilon, seconds = "—", "—"
    state_dir = os.path.join(work, name)
    if os.path.exists(f"{state_dir}/train_seconds"):
        seconds = open(f"{state_dir}/train_seconds").read().strip()
    if name.startswith("dp-"):
        dp = json.load(open(f"{state_dir}/train_config.json"))["dp"]  # the whole run's account
        epsilon = f"{dp['epsilon']:.2f} (σ {dp['noise_multiplier']:.3f}, C {dp['max_grad_norm']:g}, q {dp['sampling_rate']:.4f})"
    elif name != "public":
        epsilon = "∞ (no DP)"
    low, high = docs["rate_95ci"]
    rows.append({"model": name, "epsilon": epsilon, "extracted": docs["extracted"], "audited": docs["audited"],
                 "rate": docs["rate"], "interval": [low, high], "mean_similarity": docs["mean_similarity"],
                 "canaries": {r: c["extracted"] for r, c in zip(repeat_counts, canaries)},
                 "canary_similarity": {r: c["mean_similarity"] for r, c in zip(repeat_counts, canaries)}, "bits_per_byte": bpb, "bits_per_byte_public": bpb_public})
    found = " / ".join(str(c["extracted"]) for c in canaries)
    similar = " / ".join(f"{c['mean_similarity']:.2f}" for c in canaries)
    print(f"| {name} | {epsilon} | {docs['extracted']}/{docs['audited']} ({100*docs['rate']:.1f}% [{100*low:.1f}, {100*high:.1f}]) "
          f"| {docs['mean_similarity']:.3f} | {found} of 4 (similarity {similar}) "
          f"| {bpb:.4f} | {bpb_public:.4f} | {seconds} |")
json.dump(rows, open(os.path.join(work, "results", "table.json"), "w"), indent=1)
PY
log "done in $((SECONDS - start)) s; results in $work/results (table.json)"
