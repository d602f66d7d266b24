#!/usr/bin/env bash
# The GPU benchmark (issue #6), on a machine with a GPU, nvcc and PyTorch with CUDA:
#   1. builds the GPU build mode (scripts/gpu_build.sh; FLEXFED_GPU_DEPS=DIR for a bundled deps folder),
#   2. runs the [gpu] kernel tests and the dispatch-path tests (a failure is reported and fails the
#      script at the end; the measurements still run),
#   3. measures each kernel's GB/s against the device-to-device copy bandwidth of the same run,
#      the MoE layer's forward+backward (kernels vs the plain LibTorch layer), the fused RMSNorm and
#      AdamW (bf16 moments) against the compositions they replace, and the owner
#      training step in bf16 on the 1b config at 4×2048, 16×2048 and 8×4096 tokens and on a
#      7b-shaped model with 8 layers, each beside the plain PyTorch peer (bench/train_bench.py) on
#      the same shapes: tokens/s, MFU against a GEMM rate of the same run, peak device memory and
#      the memory plan's figure; the 1b step at 16×2048 and 8×4096 again with activation
#      checkpointing (the 40 GB goal), and the whole 7b expert in the compact plan (the 75 GB goal),
#   4. prints the table (markdown) for docs/PERFORMANCE.md.
# The whole check has a budget (FLEXFED_GPU_CHECK_SECONDS, default 350: 6 minutes with the table):
# every step runs under the smaller of its own limit and what is left of it, most important first; a
# step cut short or not started is recorded as such in the table.
# Usage: bench/gpu/run.sh [OUT_DIR]   (raw JSON lines and the table are also written there)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"
build_dir=${FLEXFED_GPU_BUILD_DIR:-build-gpu}
python=${PYTHON:-python3}
deadline=$((SECONDS + ${FLEXFED_GPU_CHECK_SECONDS:-350}))
left() { echo $((deadline - SECONDS)); }

if ! timeout "$(left)" bash scripts/gpu_build.sh "$build_dir" >"$out/build.log" 2>&1; then
  tail -n 30 "$out/build.log"
  echo "bench/gpu/run.sh: the build failed or ran past the check's budget (log: $out/build.log)" >&2
  exit 1
fi
tail -n 3 "$out/build.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# The tests first; a failure is reported at the top of the table and makes the script fail at the
# end, but the measurements still run (a lent GPU's minutes are few).
failed_tests=()
run_tests() {  # BINARY FILTER
  echo "== $1 $2"
  if timeout 90 "$build_dir/tests/$1" "$2" >"$out/$1.log" 2>&1; then
    tail -n 2 "$out/$1.log"
  else
    tail -n 40 "$out/$1.log"
    failed_tests+=("$1 \"$2\" (log: $out/$1.log)")
  fi
}
run_tests flexfed_kernel_tests "[gpu],[kernels]"
run_tests flexfed_tests "[gpu],[moe]"

# Benchmarks; each bounded, a failure (e.g. the peer running out of memory) recorded and the script
# going on.
step() {  # NAME SECONDS COMMAND...: runs it within its limit and the budget, its JSON lines into $out/NAME.jsonl
  local name=$1 limit=$2; shift 2
  : > "$out/$name.jsonl"
  echo "== $name"
  local budget=$(($(left) - 10))  # 10 s kept for the table
  if ((budget < 20)); then
    echo "{\"failed\": \"$name\", \"why\": \"not run: the check's time budget is spent\"}" | tee -a "$out/$name.jsonl"
    return
  fi
  ((limit > budget)) && limit=$budget
  local rc=0
  timeout "$limit" "$@" >"$out/$name.jsonl" 2>"$out/$name.err" || rc=$?
  cat "$out/$name.jsonl"
  tail -n 5 "$out/$name.err" >&2
  if ((rc != 0)); then
    echo "{\"failed\": \"$name\", \"why\": \"exit $rc$( ((rc == 124)) && echo ", time limit of $limit s")\"}" | tee -a "$out/$name.jsonl"
  fi
}
step kernels 30 "$build_dir/bench/flexfed_kernel_bench" --experts 2 --top-k 2  # 1b shapes: 16384 tokens, H 2048, F 8192, bf16
step moe 30 "$build_dir/bench/flexfed_moe_bench" --experts 2x2 --experts 4x2     # one MoE layer, forward + backward
# The step's fused ops against the compositions they replace, same run: RMSNorm (ATen's fused, bf16
# input) at the 1b step's [8192, 2048] and AdamW with bf16 moments over 2 layers of the 1b expert.
step elementwise 30 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 1b --layers 2 --elementwise --shape 4x2048
# Owner steps, FlexFed and the plain PyTorch peer (bench/train_bench.py: eager, SDPA, bf16 autocast,
# fused AdamW) on the same shapes.
shapes=(--shape 4x2048 --shape 16x2048 --shape 8x4096)
step train_1b 90 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 1b "${shapes[@]}"
step peer_1b 90 "$python" bench/train_bench.py --device cuda --preset 1b "${shapes[@]}"
# The 40 GB goal at 32768 tokens per micro-batch: every activation kept, the 1b step plans 82 GiB
# (docs/PERFORMANCE.md); with checkpointing 24 GiB.
step train_1b_checkpointing 60 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 1b \
  --shape 16x2048 --shape 8x4096 --activation-checkpointing
# A 7b-shaped model (hidden 4096, FFN 11008, vocabulary 100352) with 8 of its 32 layers: the owner
# step's speed at the real width, in the memory and time this check has.
step train_7b 60 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 7b --layers 8 --shape 4x2048
step peer_7b 60 "$python" bench/train_bench.py --device cuda --preset 7b --layers 8 --shape 4x2048
# The whole 7b expert (32 layers, 4.3 B trained parameters) in the compact memory plan (issue #15:
# peak ≤ 75 GB on one 80 GB card): bf16 frozen matrices, bf16 AdamW moments, activation checkpointing.
step memory_7b 240 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 7b --shape 1x4096 \
  --activation-checkpointing --optimizer-moments bf16
# Last, as time allows: two more 1b steps under LibTorch's Kineto profiler, every kernel's device
# time (where the step's time goes, and how long the GPU waits for the host).
step profile_1b 60 "$build_dir/bench/flexfed_train_bench" --device cuda --preset 1b --shape 4x2048 --profile "$out/profile_1b"
cat "$out"/train_1b.jsonl "$out"/train_1b_checkpointing.jsonl "$out"/train_7b.jsonl "$out"/memory_7b.jsonl > "$out/train.jsonl"
cat "$out"/peer_1b.jsonl "$out"/peer_7b.jsonl > "$out/peer.jsonl"

for t in "${failed_tests[@]}"; do echo "**TESTS FAILED**: $t: the figures below are not to be trusted."; done | tee "$out/table.md"
table_ok=1
"$python" bench/gpu/table.py "$out" | tee -a "$out/table.md" || { table_ok=0; echo "bench/gpu/table.py failed: the raw lines are in $out" >&2; }
if [[ -f $out/profile_1b.4x2048.json ]]; then
  { echo; echo "Profile of two 1b owner steps at 4 × 2048 tokens (bench/profile_ops.py --markdown):"; echo
    timeout 60 "$python" bench/profile_ops.py "$out/profile_1b.4x2048.json" --markdown --top 15 || echo "(profile_ops.py failed)"; } | tee -a "$out/table.md"
fi
((${#failed_tests[@]} == 0 && table_ok))
