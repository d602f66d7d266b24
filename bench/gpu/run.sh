#!/usr/bin/env bash
# The GPU benchmark (issue #6), on a machine with a GPU, nvcc and PyTorch with CUDA:
#   1. builds the GPU build mode (scripts/gpu_build.sh; FLEXFED_GPU_DEPS=DIR for a bundled deps folder),
#   2. runs the [gpu] kernel tests and the dispatch-path tests, stopping on a failure,
#   3. measures each kernel's GB/s against the device-to-device copy bandwidth of the same run,
#      the MoE layer's forward+backward (kernels vs the plain LibTorch layer), and an owner
#      training step on the 1b config in bf16 (tokens/s and MFU against a GEMM rate of the same run),
#   4. prints the table (markdown) for docs/PERFORMANCE.md.
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
echo "== owner training step, 1b, bf16 autocast"
"$build_dir/bench/flexfed_train_bench" --device cuda --preset 1b --shape "${FLEXFED_BENCH_SHAPE:-4x2048}" \
  | tee "$out/train.jsonl"

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
print("\n| owner step, 1b, bf16 | tokens/step | tokens/s | MFU | GEMM rate (same run) |\n|---|---:|---:|---:|---:|")
for t in train:
    print(f"| {t['preset']} | {t['tokens_per_step']:.0f} | {t['tokens_per_s']:.0f} | {t['mfu']:.1%} | {t['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s |")
print("\nGoals: kernels ≥ 70% of copy bandwidth; router+permute+combine ≤ 10% of the layer (the share of the E=2, k=2 layer spent in the router, align, gather and combine kernels, forward and backward, timed alone); training MFU ≥ 40%.")
PY
