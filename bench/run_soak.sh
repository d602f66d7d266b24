#!/usr/bin/env bash
# Soak benchmark (issue #34): OWNERS enrolled owners (default 8), each on its own connection, push a
# module of fresh bytes for their expert and pull the whole anchor once every ROUND seconds (default
# 1) for SECONDS (default 1800), through one real coordinator over mTLS on loopback; the
# coordinator's resident memory, open files, threads and data folder are sampled every SAMPLE
# seconds (default 30). The anchor is a random checkpoint of SIZE (default test) in float32.
# Prints the samples and a summary: first, last and largest of each, and the change over the
# second half of the run (what grows without bound grows there too). The data folder grows by
# design: every accepted module stays as the expert's history (docs/PROTOCOL.md, "Storage").
# Usage: bench/run_soak.sh [SECONDS] [OWNERS] [ROUND] [SAMPLE] [SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-1800}
owners=${2:-8}
round=${3:-1}
sample=${4:-30}
size=${5:-test}
bash scripts/build.sh >/dev/null
ctl=build/ctl/flexfedctl
owner=build/owner_client/flexfed-owner
work=$(mktemp -d)
pid=
bench=
trap 'kill $bench $pid 2>/dev/null || true; rm -rf "$work"' EXIT
"$ctl" random-checkpoint --size "$size" --dtype float32 --out "$work/anchor" >/dev/null
"$owner" router-init --public --mode random --anchor "$work/anchor" --out "$work/anchor/router_pub.safetensors" >/dev/null
"$ctl" ca init --dir "$work/ca" >"$work/ca.log"
fingerprint=$(sed -n 's/.*pin it): \([0-9a-f]\{64\}\).*/\1/p' "$work/ca.log")
build/coordinator/flexfed-coordinator --ca-dir "$work/ca" --data-dir "$work/data" --listen 127.0.0.1:0 \
  --metrics-listen "" --port-file "$work/port" 2>"$work/coordinator.log" &
pid=$!
for _ in $(seq 100); do [[ -s "$work/port" ]] && break; sleep 0.1; done
address=127.0.0.1:$(head -1 "$work/port")
export FLEXFED_COORDINATOR=$address FLEXFED_IDENTITY=$work/ca/admin
"$ctl" anchor publish "$work/anchor" --note "soak anchor ($size)" >/dev/null 2>&1
args=()
for i in $(seq "$owners"); do
  id=owner$i
  token=$("$ctl" owner add "$id" --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  "$ctl" expert register --owner "$id" --name soak --domain soak >/dev/null
  FLEXFED_IDENTITY= "$owner" enroll --owner "$id" --token "$token" --ca-cert "$work/ca/ca.crt" --ca-fingerprint "$fingerprint" \
    --coordinator "$address" --identity "$work/owners/$id" >/dev/null
  args+=(--owner "$id,$work/owners/$id,$id/soak")
done
mkdir "$work/scratch"
build/bench/flexfed_soak_bench --coordinator "$address" "${args[@]}" --dir "$work/scratch" --seconds "$seconds" \
  --round-seconds "$round" >"$work/result.json" 2>"$work/progress.log" &
bench=$!
echo -e "t_s\trss_mib\tfds\tthreads\tdata_mib\trounds" | tee "$work/samples.tsv"
start=$(date +%s)
while kill -0 "$bench" 2>/dev/null; do
  t=$(($(date +%s) - start))
  rss=$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")
  threads=$(awk '/Threads/ {print $2}' "/proc/$pid/status")
  fds=$(ls "/proc/$pid/fd" | wc -l)
  data=$(du -sm "$work/data" 2>/dev/null | cut -f1 || true)  # files come and go while it counts
  rounds=$(tail -1 "$work/progress.log" 2>/dev/null | sed -n 's/.*"rounds":\([0-9]*\).*/\1/p')
  echo -e "$t\t$rss\t$fds\t$threads\t$data\t${rounds:-0}" | tee -a "$work/samples.tsv"
  sleep "$sample"
done
if ! wait "$bench"; then
  tail -5 "$work/progress.log"
  kill "$pid" 2>/dev/null || true
  trap - EXIT  # the folder stays, for its logs
  echo "soak: the owners failed (above; coordinator log: $work/coordinator.log)" >&2
  exit 1
fi
kill "$pid"
wait "$pid" 2>/dev/null || true
/usr/bin/python3 - "$work/samples.tsv" "$work/result.json" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
r = json.load(open(sys.argv[2]))
print(f"{r['owners']} owners, {r['rounds']} rounds (a module pushed and the anchor pulled in each) in {r['seconds']:.0f} s: "
      f"{r['up_mib']:.0f} MiB up, {r['down_mib']:.0f} MiB down")
half = rows[len(rows) // 2]
for key, unit in (("rss_mib", "MiB"), ("fds", ""), ("threads", ""), ("data_mib", "MiB")):
    v = [float(x[key]) for x in rows]
    print(f"  {key:9s} first {v[0]:8.1f} last {v[-1]:8.1f} max {max(v):8.1f} {unit:3s}  "
          f"second half {float(rows[-1][key]) - float(half[key]):+8.1f}")
PY
