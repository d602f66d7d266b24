#!/usr/bin/env bash
# The GPU benchmark (issue #6), on a machine with a GPU, nvcc and PyTorch with CUDA:
#   1. builds the GPU build mode (scripts/gpu_build.sh; FLEXFED_GPU_DEPS=DIR for a bundled deps folder),
#   2. runs the [gpu] kernel tests and the dispatch-path tests, stopping on a failure,
#   3. measures each kernel's GB/s against the device-to-device copy bandwidth of the same run,
#      the MoE layer's forward+backward (kernels vs the plain LibTorch layer), and the owner
#      training step in bf16 on the 1b config at 4×2048, 16×2048 and 8×4096 tokens and on a
#      7b-shaped model with 8 layers, each beside the plain PyTorch peer (bench/train_bench.py) on
#      the same shapes: tokens/s, MFU against a GEMM rate of the same run, peak device memory and
#      the memory plan's figure,
#   4. prints the table (markdown) for docs/PERFORMANCE.md.
# Every benchmark step has its own time limit; the whole check is meant to fit 6 minutes on an
# H100/H200 (build included).
# Usage: bench/gpu/run.sh [OUT_DIR]   (raw JSON lines and the table are also written there)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"
build_dir=${FLEXFED_GPU_BUILD_DIR:-build-gpu}
python=${PYTHON:-python3}

bash scripts/gpu_build.sh "$build_dir" 2>&1 | tail -n 3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

echo "== tests"
"$build_dir/tests/flexfed_kernel_tests" "[gpu],[kernels]" | tail -n 3
"$build_dir/tests/flexfed_tests" "[gpu],[moe]" | tail -n 2

echo "== kernels (1b shapes: 16384 tokens, hidden 2048, FFN 8192, bf16)"
"$build_dir/bench/flexfed_kernel_bench" --experts 2 --top-k 2 | tee "$out/kernels.jsonl"
echo "== MoE layer forward+backward"
"$build_dir/bench/flexfed_moe_bench" --experts 2x2 --experts 4x2 | tee "$out/moe.jsonl"
# Owner steps, FlexFed and the plain PyTorch peer (bench/train_bench.py: eager, SDPA, bf16
# autocast, fused AdamW) on the same shapes; each step bounded, a failure (e.g. the peer running out
# of memory) recorded and the script going on.
step() {  # NAME SECONDS COMMAND...: runs it with a time limit, its JSON lines into $out/NAME.jsonl
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local rc=0
  timeout "$limit" "$@" > >(tee "$out/$name.jsonl") 2> >(tee "$out/$name.err" >&2) || rc=$?
  if ((rc != 0)); then
    echo "{\"failed\": \"$name\", \"why\": \"exit $rc$( ((rc == 124)) && echo ', time limit')\"}" | tee -a "$out/$name.jsonl"
  fi
}
shapes=(--shape 4x2048 --shape 16x2048 --shape 8x4096)
step train_1b 120 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 1b "${shapes[@]}"
step peer_1b 120 "$python" bench/train_bench.py --device cuda --preset 1b "${shapes[@]}"
# A 7b-shaped model (hidden 4096, FFN 11008, vocabulary 100352) with 8 of its 32 layers: the owner
# step's speed at the real width, in the memory and time this check has.
step train_7b 90 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 7b --layers 8 --shape 4x2048
step peer_7b 90 "$python" bench/train_bench.py --device cuda --preset 7b --layers 8 --shape 4x2048
# The whole 7b expert (32 layers, 4.3 B trained parameters) in the compact memory plan (issue #15:
# peak ≤ 75 GB on one 80 GB card): bf16 frozen matrices, bf16 AdamW moments, activation checkpointing.
step memory_7b 240 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 7b --shape 1x4096 \
  --activation-checkpointing --optimizer-moments bf16
cat "$out"/train_1b.jsonl "$out"/train_7b.jsonl "$out"/memory_7b.jsonl > "$out/train.jsonl"
cat "$out"/peer_1b.jsonl "$out"/peer_7b.jsonl > "$out/peer.jsonl"

"$python" - "$out" <<'PY' | tee "$out/table.md"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
load = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines() if l.startswith("{")]
kernels, moe, train = load("kernels.jsonl"), load("moe.jsonl"), load("train.jsonl")
gpu = (out / "gpu.txt").read_text().strip()
print(f"Card: {gpu}. Copy bandwidth (device to device, read + write): {kernels[0]['copy_gb_per_s']:.0f} GB/s.\n")
print("| kernel | µs | GB/s | of copy | goal ≥ 70% |\n|---|---:|---:|---:|---|")
for k in kernels:
    print(f"| {k['kernel']} | {k['seconds'] * 1e6:.1f} | {k['gb_per_s']:.0f} | {k['of_copy']:.0%} | {'met' if k['of_copy'] >= 0.7 else 'not met'} |")
glue = sum(k["seconds"] for k in kernels if not k["kernel"].startswith("swiglu"))
print("\n| MoE layer fwd+bwd (16384 tokens) | LibTorch ms | kernels ms | speed-up | expert TFLOP/s | router+permute+combine share |\n|---|---:|---:|---:|---:|---:|")
for m in moe:
    share = f"{glue / m['dispatch_seconds']:.1%}" if (m["experts"], m["top_k"]) == (kernels[0]["experts"], kernels[0]["top_k"]) else "—"
    print(f"| E={m['experts']}, k={m['top_k']} | {m['libtorch_seconds'] * 1e3:.2f} | {m['dispatch_seconds'] * 1e3:.2f} | {m['speedup']:.2f}× | {m['dispatch_tflops']:.0f} | {share} |")
print("\n| owner step, bf16 | layers | tokens/step | FlexFed tokens/s | PyTorch peer tokens/s | ratio | FlexFed MFU | peak GiB (plan) | peer peak GiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
peer = {(p.get("preset"), p.get("layers"), p.get("tokens_per_step")): p for p in load("peer.jsonl") if "tokens_per_s" in p}
for t in train:
    if "tokens_per_s" not in t:
        print(f"| {t.get('failed')} | | | failed: {t.get('why')} | | | | | |")
        continue
    compact = t.get("activation_checkpointing", False)
    p = None if compact else peer.get((t["preset"], t["layers"], t["tokens_per_step"]))
    if compact:
        t["preset"] += ", checkpointing, bf16 moments"
    gib = lambda b: f"{b / 2**30:.1f}"
    print(f"| {t['preset']} | {t['layers']} | {t['tokens_per_step']:.0f} | {t['tokens_per_s']:.0f} | "
          f"{p['tokens_per_s']:.0f} | {t['tokens_per_s'] / p['tokens_per_s']:.2f}× | " if p else
          f"| {t['preset']} | {t['layers']} | {t['tokens_per_step']:.0f} | {t['tokens_per_s']:.0f} | {'not run' if compact else 'failed'} | — | ", end="")
    print(f"{t['mfu']:.1%} of {t['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s | {gib(t.get('peak_device_bytes', 0))} ({gib(t.get('planned_bytes', 0))}) | "
          f"{gib(p['peak_device_bytes']) if p else '—'} |")
print("\nGoals: kernels ≥ 70% of copy bandwidth; router+permute+combine ≤ 10% of the layer (the share of the E=2, k=2 layer spent in the router, align, gather and combine kernels, forward and backward, timed alone); owner step ≥ 60% of the GEMM rate and ≥ 1.5× the PyTorch peer (issue #15); the 1b step at 16×2048 and 8×4096 tokens within 40 GiB; the whole 7b expert (checkpointing, bf16 moments) within 75 GB = 69.8 GiB.")
PY
