#!/usr/bin/env bash
# Transfer benchmark (issue #4): upload and download of a SIZE MiB blob (default 1024) through a
# real coordinator over mTLS on loopback, against raw TLS throughput measured in the same run, and
# the coordinator's peak RSS. Usage: bench/run_transfer_bench.sh [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
size=${1:-1024}
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
build/ctl/flexfedctl ca init --dir "$work/ca" >/dev/null
build/coordinator/flexfed-coordinator --ca-dir "$work/ca" --data-dir "$work/data" --listen 127.0.0.1:0 \
  --metrics-listen "" --port-file "$work/port" 2>"$work/coordinator.log" &
pid=$!
for _ in $(seq 100); do [[ -s "$work/port" ]] && break; sleep 0.1; done
port=$(head -1 "$work/port")
flexfed=$(build/bench/flexfed_transfer_bench --coordinator "127.0.0.1:$port" --identity "$work/ca/admin" --dir "$work" --size-mib "$size")
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
raw=$(/usr/bin/python3 bench/raw_tls_bench.py "$work/data/server.crt" "$work/data/server.key" "$work/ca/ca.crt" "$size")
/usr/bin/python3 - "$flexfed" "$raw" "$rss_kib" <<'PY'
import json, sys
f, r, rss = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
raw = r["raw_tls_mib_s"]
print(f"blob {f['size_mib']} MiB over mTLS on loopback")
print(f"  upload   {f['upload_mib_s']:7.1f} MiB/s  = {f['upload_mib_s'] / raw:5.0%} of raw TLS")
print(f"  download {f['download_mib_s']:7.1f} MiB/s  = {f['download_mib_s'] / raw:5.0%} of raw TLS")
print(f"  raw TLS  {raw:7.1f} MiB/s (same machine, same run)")
print(f"  coordinator peak RSS {rss / 1024:.0f} MiB")
PY
