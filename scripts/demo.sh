#!/usr/bin/env bash
# The README's main command: the whole FlexFed story on one machine (docs/ARCHITECTURE.md §9).
#   set-up and build → domain text from Debian packages → a `tiny` public anchor (pretrained once,
#   then reused) → a coordinator on loopback with mTLS → three owners (code, math, scripture),
#   each enrolling, pulling the anchor, training its expert and pushing it from its own processes
#   → the operator enables the experts and builds releases → the evaluation suite (baselines,
#   ablations, opt-outs) → a table on the terminal and an HTML report.
# Everything lands in $FLEXFED_DEMO_DIR (default build/demo); downloads, the token cache and the
# anchor are cached in $FLEXFED_DEMO_CACHE (default ~/.cache/flexfed-demo). docs/EVALUATION.md
# explains the rows, the settings and the latest results.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
start_all=$SECONDS

step_name="set-up and build"
coordinator_pid=""
on_exit() {
  local code=$?
  if [[ -n $coordinator_pid ]] && kill -0 "$coordinator_pid" 2>/dev/null; then
    kill "$coordinator_pid" 2>/dev/null || true
    wait "$coordinator_pid" 2>/dev/null || true
    echo "coordinator stopped"
  fi
  jobs -p | xargs -r kill 2>/dev/null || true
  if ((code != 0)); then
    echo "demo FAILED during: $step_name (exit $code); logs are in ${work:-build/demo}/logs" >&2
  fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

declare -A phase_seconds
phase_order=()
phase_start=$SECONDS
begin() {
  step_name=$1
  phase_start=$SECONDS
  printf '\n== %s\n' "$1"
}
end() {
  phase_seconds[$step_name]=$((SECONDS - phase_start))
  phase_order+=("$step_name")
}

begin "set-up and build"
bash scripts/build.sh
end

build=$repo/${FLEXFED_BUILD_DIR:-build}
ctl=$build/ctl/flexfedctl
owner=$build/owner_client/flexfed-owner
coordinatord=$build/coordinator/flexfed-coordinator
evaluate=$build/evaluation/flexfed-evaluate
cache=${FLEXFED_DEMO_CACHE:-$HOME/.cache/flexfed-demo}
work=${FLEXFED_DEMO_DIR:-$repo/build/demo}
export FLEXFED_CACHE_DIR=$cache  # token cache: $cache/tokens
threads=$(nproc)

# The recipe (docs/EVALUATION.md). Owners' and ablation runs share it; only the anchor is cached.
anchor_steps=${FLEXFED_DEMO_ANCHOR_STEPS:-200}
expert_steps=${FLEXFED_DEMO_EXPERT_STEPS:-40}
expert_lr=${FLEXFED_DEMO_EXPERT_LR:-1e-3}
public_share=${FLEXFED_DEMO_PUBLIC_SHARE:-0.05}  # router-init --public-share: biases calibrated on the public text
# The anchor: auto (the reproduction run's when bench/reproduce.sh has cached one, else the tiny byte
# model pretrained here), tiny, or an anchor folder. The data: the demo's, or large (public text of
# tens of MB, as bench/reproduce.sh uses).
anchor_choice=${FLEXFED_DEMO_ANCHOR:-auto}
eval_sequences=${FLEXFED_DEMO_EVAL_SEQUENCES:-32}  # held-out sequences per domain in the evaluation
router_tune_steps=${FLEXFED_DEMO_ROUTER_TUNE_STEPS:-50}  # flexfedctl router-tune on the public proxy text (0 = skip)
read -r -a ablations <<<"${FLEXFED_DEMO_ABLATIONS:-random nobias dense encoder}"  # the ablation experts trained
for kind in "${ablations[@]}"; do
  [[ $kind =~ ^(random|nobias|dense|encoder)$ ]] || { echo "FLEXFED_DEMO_ABLATIONS: '$kind' is not random, nobias, dense or encoder" >&2; exit 2; }
done
data_size=${FLEXFED_DEMO_DATA:-}
[[ -z $data_size || $data_size == large ]] || { echo "FLEXFED_DEMO_DATA must be large or unset" >&2; exit 2; }
train_args=(--seq-len 256 --batch-size 16 --val-every 0 --log-every 10 --checkpoint-every 1000 --plain)
owners=(code math scripture)
declare -A org=([code]=pyorg [math]=mathlab [scripture]=abbey)
declare -A describe=([code]="Python standard library source" [math]="Metamath set.mm formal proofs"
                     [scripture]="King James Bible")

begin "domain text from Debian packages"
bash scripts/demo/fetch_data.sh "$cache" $data_size
data=$cache/data${data_size:+-$data_size}
end

begin "public anchor"
anchor_key=$( (sha256sum "$data/public/train.jsonl" | cut -d' ' -f1; echo "tiny steps=$anchor_steps lr=3e-3 recipe=3") | sha256sum | cut -c1-16)
anchor=$cache/anchor-$anchor_key
if [[ $anchor_choice == auto && -f $cache/reproduction-anchor/router_pub.safetensors ]]; then
  anchor=$(readlink -f "$cache/reproduction-anchor")
  echo "using the reproduction run's anchor (bench/reproduce.sh; FLEXFED_DEMO_ANCHOR=tiny for the demo's own): $anchor"
elif [[ $anchor_choice != auto && $anchor_choice != tiny ]]; then
  anchor=$(readlink -f "$anchor_choice")
  [[ -f $anchor/router_pub.safetensors ]] || {
    echo "FLEXFED_DEMO_ANCHOR=$anchor_choice: not an anchor folder with router_pub.safetensors (flexfed-owner router-init --public)" >&2
    exit 2
  }
  echo "using $anchor"
elif [[ -f $anchor/router_pub.safetensors ]]; then
  echo "reusing $anchor"
else
  rm -rf "$cache/anchor-run-$anchor_key" "$anchor.tmp"
  "$owner" train --pretrain tiny --run "$cache/anchor-run-$anchor_key" --data "$data/public/train.jsonl" \
    --steps "$anchor_steps" --lr 3e-3 --warmup 20 "${train_args[@]}" --threads "$threads"
  cp -r "$cache/anchor-run-$anchor_key/model" "$anchor.tmp"
  "$owner" router-init --public --anchor "$anchor.tmp" --data "$data/public/train.jsonl" --samples 200 \
    --out "$anchor.tmp/router_pub.safetensors" --threads "$threads"
  mv "$anchor.tmp" "$anchor"
  rm -rf "$cache/anchor-run-$anchor_key"
fi
end

begin "coordinator on loopback with mTLS"
rm -rf "$work" && mkdir -p "$work/logs"
"$ctl" ca init --dir "$work/ca" >"$work/logs/ca.log"
fingerprint=$(sed -n 's/.*pin it): \([0-9a-f]\{64\}\).*/\1/p' "$work/logs/ca.log")
"$coordinatord" --ca-dir "$work/ca" --data-dir "$work/coordinator" --listen 127.0.0.1:0 \
  --port-file "$work/coordinator.port" --metrics-listen 127.0.0.1:0 >"$work/logs/coordinator.log" 2>&1 &
coordinator_pid=$!
for _ in $(seq 100); do [[ -s $work/coordinator.port ]] && break; sleep 0.1; done
[[ -s $work/coordinator.port ]] || { echo "the coordinator did not start; see $work/logs/coordinator.log" >&2; exit 1; }
address=127.0.0.1:$(sed -n 1p "$work/coordinator.port")
metrics=127.0.0.1:$(sed -n 2p "$work/coordinator.port")
export FLEXFED_COORDINATOR=$address FLEXFED_IDENTITY=$work/ca/admin
echo "coordinator at $address (metrics at http://$metrics/metrics), CA fingerprint ${fingerprint:0:16}…"
"$ctl" anchor publish "$anchor" --note "public anchor $(basename "$anchor")"
for d in "${owners[@]}"; do
  token=$("$ctl" owner add "${org[$d]}" --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  echo "$token" >"$work/logs/${org[$d]}.token"
  "$ctl" expert register --owner "${org[$d]}" --name "$d" --domain "${describe[$d]}" >/dev/null
  echo "owner ${org[$d]}: expert ${org[$d]}/$d registered, one-time token issued"
done
end

# One owner's whole side, in its own processes, on its own folder: only parameters leave it.
owner_side() {
  local d=$1 id=${org[$1]} home=$work/owners/${org[$1]}
  mkdir -p "$home"
  unset FLEXFED_IDENTITY FLEXFED_COORDINATOR
  local net=(--coordinator "$address" --identity "$home/identity")
  "$owner" enroll --owner "$id" --token "$(cat "$work/logs/$id.token")" --ca-cert "$work/ca/ca.crt" \
    --ca-fingerprint "$fingerprint" "${net[@]}"
  "$owner" pull --to "$home/anchor" "${net[@]}"
  "$owner" router-init --anchor "$home/anchor" --data "$data/$d/train.jsonl" --samples 200 \
    --public-data "$data/public/train.jsonl" --public-share "$public_share" --out "$home/router.safetensors" --threads 1
  "$owner" train --anchor "$home/anchor" --router-init "$home/router.safetensors" --run "$home/run" \
    --data "$data/$d/train.jsonl" --steps "$expert_steps" --lr "$expert_lr" --warmup 5 "${train_args[@]}" --threads 1
  "$owner" export --run "$home/run" --anchor "$home/anchor" --out "$home/$d.expert.safetensors" \
    --owner "$id" --name "$d" --domain "${describe[$d]}"
  "$owner" push "$home/$d.expert.safetensors" --expert "$id/$d" --anchor "$home/anchor" "${net[@]}"
}

# The ablations' experts (random router init; dense, no coordination): trained like the owners'
# on the same data, kept local — they are evaluation baselines, not part of the federation.
ablation_side() {
  local d=$1 kind=$2 home=$work/ablations/$2-$1 anchor_copy=$work/owners/${org[$1]}/anchor
  mkdir -p "$home"
  if [[ $kind == random ]]; then
    "$owner" router-init --mode random --seed 7 --anchor "$anchor_copy" --out "$home/router.safetensors"
    "$owner" train --anchor "$anchor_copy" --router-init "$home/router.safetensors" --run "$home/run" \
      --data "$data/$d/train.jsonl" --steps "$expert_steps" --lr "$expert_lr" --warmup 5 "${train_args[@]}" --threads 1
  elif [[ $kind == encoder ]]; then  # the paper's init: rows from a sentence encoder, bias calibrated as the owners'
    "$repo/.venv/bin/python" "$repo/scripts/router_vectors.py" --anchor "$anchor_copy" --data "$data/$d/train.jsonl" \
      --public "$data/public/train.jsonl" --samples 200 --out "$home/vectors.safetensors"
    "$owner" router-init --mode vectors --vectors "$home/vectors.safetensors" --anchor "$anchor_copy" --samples 200 \
      --public-data "$data/public/train.jsonl" --public-share "$public_share" --out "$home/router.safetensors" --threads 1
    "$owner" train --anchor "$anchor_copy" --router-init "$home/router.safetensors" --run "$home/run" \
      --data "$data/$d/train.jsonl" --steps "$expert_steps" --lr "$expert_lr" --warmup 5 "${train_args[@]}" --threads 1
  elif [[ $kind == nobias ]]; then  # the paper's ablation: trained without the bias, not just without it at inference
    "$owner" router-init --anchor "$anchor_copy" --data "$data/$d/train.jsonl" --samples 200 \
      --out "$home/router.safetensors" --threads 1
    "$owner" train --anchor "$anchor_copy" --router-init "$home/router.safetensors" --run "$home/run" --router-bias false \
      --data "$data/$d/train.jsonl" --steps "$expert_steps" --lr "$expert_lr" --warmup 5 "${train_args[@]}" --threads 1
  else
    "$owner" router-init --anchor "$anchor_copy" --data "$data/$d/train.jsonl" --samples 200 \
      --public-data "$data/public/train.jsonl" --public-share "$public_share" --out "$home/router.safetensors" --threads 1
    "$owner" train --dense --anchor "$anchor_copy" --run "$home/run" \
      --data "$data/$d/train.jsonl" --steps "$expert_steps" --lr "$expert_lr" --warmup 5 "${train_args[@]}" --threads 1
  fi
  "$owner" export --run "$home/run" --anchor "$anchor_copy" --out "$home/expert.safetensors" --owner "${org[$d]}" \
    --name "$d" --domain "${describe[$d]}" $([[ $kind == dense ]] && echo --router-init "$home/router.safetensors")
}

# Runs "$@" for every item in parallel (one process each, output prefixed), failing if any fails.
in_parallel() {
  local fn=$1 arg=$2; shift 2
  local pids=() names=()
  for d in "$@"; do
    ( "$fn" "$d" $arg 2>&1 | sed -u "s/^/[$d${arg:+ $arg}] /" ) > >(tee "$work/logs/$fn-$d$arg.log") &
    pids+=($!) names+=("$d")
  done
  local failed=()
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed+=("${names[$i]}"); done
  if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (logs in $work/logs)" >&2
    return 1
  fi
}

begin "owners: enroll, pull, router-init, train, export, push (one process tree each)"
in_parallel owner_side "" "${owners[@]}"
end

begin "operator: enable the experts, build releases, export"
for d in "${owners[@]}"; do "$ctl" expert enable "${org[$d]}/$d" >/dev/null; done
"$ctl" expert list
"$ctl" release build --note "all experts"
"$ctl" release build --exclude mathlab/math --note "math opted out" >/dev/null
"$ctl" release list
# Its last line says whether transformers and vLLM compute this checkpoint as FlexFed does, and how
# far apart on held-out public text (docs/RELEASES.md).
"$ctl" release export rel-0001 "$work/release" --anchor "$anchor" \
  --held-out "$data/public/heldout.jsonl" --held-out-sequences 16 --held-out-seq-len 256
echo
echo "A sample from the merged model (greedy, every expert):"
"$ctl" generate "$work/release" --prompt "def read_config(path):" --max-new-tokens 80 --threads "$threads"
end

begin "operator: router tuning on public proxy text (optional, versioned apart)"
# The paper's optional router tuning: only the merged model's routers train, on public proxy text — a
# public look-alike of every domain and public text, no owner's data (scripts/demo/prepare_data.py);
# the result is one file for exactly these modules (docs/EVALUATION.md, row "with router tuning").
if ((router_tune_steps > 0)); then
  modules=()
  for d in "${owners[@]}"; do modules+=(--module "$work/owners/${org[$d]}/$d.expert.safetensors"); done
  "$ctl" router-tune --anchor "$anchor" "${modules[@]}" --data "$data/proxy/train.jsonl" --run "$work/router-tuning" \
    --steps "$router_tune_steps" --warmup 5 "${train_args[@]}" --threads "$threads"
fi
end

begin "ablation experts: ${ablations[*]}"
for kind in "${ablations[@]}"; do in_parallel ablation_side "$kind" "${owners[@]}"; done
end

begin "evaluation suite"
/usr/bin/python3 - "$work" "$anchor" "$data" "$eval_sequences" "${ablations[*]}" <<'PY'
import json, os, sys
work, anchor, data, sequences, ablations = sys.argv[1:]
ablations = ablations.split()
tuning = f"{work}/router-tuning/router_tuning.safetensors"
orgs = {"code": "pyorg", "math": "mathlab", "scripture": "abbey"}
spec = {
    "anchor": anchor,
    "domains": [{"name": d, "heldout": f"{data}/{d}/heldout.jsonl"} for d in ["public", "code", "math", "scripture"]]
               + [{"name": "mixed", "heldout": f"{data}/mixed/heldout.jsonl", "mixed": True}],
    "public_domain": "public",
    "owners": [dict({"name": d, "domain": d, "module": f"{work}/owners/{o}/{d}.expert.safetensors"},
                    **{field: f"{work}/ablations/{kind}-{d}/expert.safetensors"
                       for kind, field in [("random", "random_init_module"), ("dense", "dense_module"),
                                           ("nobias", "no_bias_module"), ("encoder", "encoder_init_module")]
                       if kind in ablations})
               for d, o in orgs.items()],
    "top_k": [0, 2],
    "router_tuning": tuning if os.path.exists(tuning) else "",
    "seq_len": 256, "max_sequences": int(sequences), "batch_size": 8, "btm_prefix": 32, "btm_tau": 1.0,
}
json.dump(spec, open(f"{work}/suite.json", "w"), indent=2)
PY
"$evaluate" "$work/suite.json" --out "$work/results.json"
end

total=$((SECONDS - start_all))
echo
echo "Time per step (this run):"
for p in "${phase_order[@]}"; do printf '  %4d s  %s\n' "${phase_seconds[$p]}" "$p"; done
printf '  %4d s  total\n' "$total"
for p in "${phase_order[@]}"; do printf '%s\t%s\n' "$p" "${phase_seconds[$p]}"; done >"$work/timings.tsv"
printf 'total\t%s\n' "$total" >>"$work/timings.tsv"
/usr/bin/python3 scripts/demo/report.py "$work"
echo "report: $work/report.html  (results: $work/results.json)"
