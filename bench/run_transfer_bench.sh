#!/usr/bin/env bash
# Transfer benchmark (issues #4, #13): upload and download of SIZE MiB (default 1024) through a real
# coordinator over mTLS on loopback — by one client, then by CLIENTS clients at once (default 8,
# each with its own share and its own connection) — against raw TLS throughput measured in the same
# run, with the coordinator's peak RSS in each part (a fresh coordinator for each).
# Usage: bench/run_transfer_bench.sh [SIZE_MIB] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
size=${1:-1024}
clients=${2:-8}
work=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
build/ctl/flexfedctl ca init --dir "$work/ca" >/dev/null

# Starts a coordinator on a fresh data folder, runs the FlexFed client with N clients, prints its
# JSON with the coordinator's peak RSS (KiB) added.
run() {
  local n=$1 data="$work/data-$1"
  rm -f "$work/port"
  build/coordinator/flexfed-coordinator --ca-dir "$work/ca" --data-dir "$data" --listen 127.0.0.1:0 \
    --metrics-listen "" --port-file "$work/port" 2>"$work/coordinator-$n.log" &
  pid=$!
  for _ in $(seq 100); do [[ -s "$work/port" ]] && break; sleep 0.1; done
  local out
  out=$(build/bench/flexfed_transfer_bench --coordinator "127.0.0.1:$(head -1 "$work/port")" --identity "$work/ca/admin" \
    --dir "$work" --size-mib "$size" --clients "$n")
  local rss
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  cp "$data/server.crt" "$data/server.key" "$work/"
  rm -rf "$data"
  echo "${out%\}},\"rss_kib\":$rss}"
}
one=$(run 1)
many=$(run "$clients")
raw=$(/usr/bin/python3 bench/raw_tls_bench.py "$work/server.crt" "$work/server.key" "$work/ca/ca.crt" "$size")
/usr/bin/python3 - "$one" "$many" "$raw" <<'PY'
import json, sys
one, many, r = (json.loads(a) for a in sys.argv[1:4])
raw = r["raw_tls_mib_s"]
print(f"{one['size_mib']:.0f} MiB over mTLS on loopback; raw TLS {raw:.1f} MiB/s (same machine, same run)")
for f in (one, many):
    print(f"  {f['clients']} client(s): upload {f['upload_mib_s']:7.1f} MiB/s = {f['upload_mib_s'] / raw:4.0%} of raw TLS, "
          f"download {f['download_mib_s']:7.1f} MiB/s = {f['download_mib_s'] / raw:4.0%}; coordinator peak RSS {f['rss_kib'] / 1024:.0f} MiB")
print(f"  {many['clients']} clients at once vs 1, in total: upload {many['upload_mib_s'] / one['upload_mib_s']:.2f}x, "
      f"download {many['download_mib_s'] / one['download_mib_s']:.2f}x")
PY
