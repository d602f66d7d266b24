#!/usr/bin/env bash
# bench/gpu/run.sh's control flow, without a GPU: in a copy of the tree whose build, nvidia-smi,
# tests and benchmarks are stand-ins printing lines in the real programs' formats (the table's
# reading of the real programs' output is tests/scripts/gpu_table_test.py), checks that
#   1. a full run writes the table with every step's rows and the profile summary, and exits 0;
#   2. a failing [gpu] test heads the table, the measurements still run, and the script exits 1;
#   3. a benchmark that fails or runs past its limit is listed, the others still measured;
#   4. the budget holds: steps it cannot fit are listed as not run, and the whole run ends in time;
#   5. a build that fails stops the script with its log.
# Usage: gpu_check_test.sh PYTHON
set -euo pipefail
python=$1
[[ $python == /* ]] || python=$PWD/$python  # the checks run in another folder
src=$(cd "$(dirname "$0")/../.." && pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/{scripts,bench/gpu,build-gpu/tests,build-gpu/bench,bin}
cp "$src/bench/gpu/run.sh" "$src/bench/gpu/table.py" "$tree/bench/gpu/"
cp "$src/bench/profile_ops.py" "$tree/bench/"
cd "$tree"
cat > scripts/gpu_build.sh <<'SH'
echo building; [[ -n ${FAKE_BUILD_FAILS:-} ]] && { echo "error: no nvcc" >&2; exit 2; }; echo built
SH
printf '#!/bin/sh\necho "NVIDIA H200, 570.00, 143771 MiB"\n' > bin/nvidia-smi
printf '#!/bin/sh\necho "All tests passed (2 assertions in 2 test cases)"\n' > build-gpu/tests/flexfed_kernel_tests
cat > build-gpu/tests/flexfed_tests <<'SH'
#!/bin/sh
if [ -n "$FAKE_TEST_FAILS" ]; then echo "test cases: 3 | 2 passed | 1 failed"; exit 1; fi
echo "All tests passed (9 assertions in 3 test cases)"
SH
cat > build-gpu/bench/flexfed_kernel_bench <<'SH'
#!/bin/sh
for k in router align gather combine swiglu swiglu_backward; do
  echo "{\"kernel\": \"$k\", \"seconds\": 1e-5, \"gb_per_s\": 3500, \"of_copy\": 0.83, \"copy_gb_per_s\": 4220, \"experts\": 2, \"top_k\": 2}"
done
SH
cat > build-gpu/bench/flexfed_moe_bench <<'SH'
#!/bin/sh
echo '{"experts": 2, "top_k": 2, "tokens": 16384, "libtorch_seconds": 0.011, "dispatch_seconds": 0.010, "speedup": 1.1, "dispatch_tflops": 500}'
[ -n "$FAKE_MOE_FAILS" ] && { echo "moe: out of memory" >&2; exit 3; }
exit 0
SH
cat > build-gpu/bench/flexfed_train_bench <<'SH'
#!/bin/bash
preset=1b layers=16 ck=false moments=fp32 shapes=() profile=
if [[ " $* " == *" --elementwise "* ]]; then
  echo '{"impl": "elementwise", "device": "cuda", "op": "rms_norm", "shape": [8192, 2048], "fused_seconds": 0.0004, "aten_seconds": 0.002, "speedup": 5.0}'
  exit 0
fi
while (($#)); do
  case $1 in
    --preset) preset=$2; shift ;; --layers) layers=$2; shift ;; --shape) shapes+=("$2"); shift ;;
    --activation-checkpointing) ck=true ;; --optimizer-moments) moments=$2; shift ;; --profile) profile=$2; shift ;;
  esac
  shift
done
[[ $preset == 7b && $layers == 16 ]] && layers=32
[[ $preset == 7b && $layers == 32 ]] && sleep "${FAKE_7B_SECONDS:-0}"
for s in "${shapes[@]}"; do
  b=${s%x*} t=${s#*x} n=$((${s%x*} * ${s#*x}))
  echo "{\"preset\": \"$preset\", \"layers\": $layers, \"batch\": $b, \"seq_len\": $t, \"tokens_per_step\": $n, \"tokens_per_s\": 50000, \"mfu\": 0.45, \"gemm_flops_per_s\": 7.5e14, \"peak_device_bytes\": $((n * 1000000)), \"planned_bytes\": $((n * 1100000)), \"peak_reserved_bytes\": $((n * 1200000)), \"activation_checkpointing\": $ck, \"optimizer_moments\": \"$moments\"}"
done
if [[ -n $profile ]]; then
  echo '{"traceEvents": [{"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "pid": 0, "tid": 7, "ts": 0, "dur": 80}, {"ph": "X", "cat": "kernel", "name": "flash_fwd_kernel", "pid": 0, "tid": 7, "ts": 90, "dur": 10}]}' > "$profile.${shapes[0]}.json"
fi
SH
cat > bench/train_bench.py <<'PY'
import json, sys
a = sys.argv
preset, layers = a[a.index("--preset") + 1], int(a[a.index("--layers") + 1]) if "--layers" in a else 16
for i, x in enumerate(a):
    if x == "--shape":
        b, t = map(int, a[i + 1].split("x"))
        print(json.dumps({"impl": "python", "preset": preset, "layers": layers, "batch": b, "seq_len": t,
                          "tokens_per_step": b * t, "tokens_per_s": 30000, "peak_device_bytes": b * t * 2000000}))
PY
chmod +x bin/* build-gpu/tests/* build-gpu/bench/*
export PATH=$tree/bin:$PATH PYTHON=$python
fail() { echo "FAILED: $*" >&2; exit 1; }

# 1. A full run.
bash bench/gpu/run.sh "$tree/out1" > "$tree/log1" 2>&1 || fail "a full run exited $? ($(tail -n 5 "$tree/log1"))"
t=$tree/out1/table.md
grep -q "^| 1b | 16 | 16 × 2048 | 50000 | 30000 | 1.67× |" "$t" || fail "no 1b row beside the peer: $(cat "$t")"
grep -q "^| 1b, checkpointing | 16 | 8 × 4096 | .*| ≤ 40 GB: met |" "$t" || fail "no checkpointed 1b row"
grep -q "^| 7b, checkpointing, bf16 moments | 32 | 1 × 4096 | .*| 3.8 (4.2) | 4.6 | ≤ 75 GB: met |" "$t" || fail "no 7b memory row (peak, plan, reserved)"
grep -q "^| E=2, k=2 | 16384 |" "$t" || fail "no MoE row"
grep -q "^| rms_norm | 8192 × 2048 | 0.400 | 2.000 | 5.00× |" "$t" || fail "no fused-op row"
grep -q "^GPU busy 90.0% of the traced span" "$t" || fail "no profile summary"
grep -q "Not measured" "$t" && fail "a full run lists a step as not measured"

# 2. A failing [gpu] test: reported first, the measurements still made, exit 1.
if FAKE_TEST_FAILS=1 bash bench/gpu/run.sh "$tree/out2" > "$tree/log2" 2>&1; then fail "a failing test did not fail the run"; fi
head -n 1 "$tree/out2/table.md" | grep -q '^\*\*TESTS FAILED\*\*: flexfed_tests' || fail "the failed test does not head the table"
grep -q "^| 1b | 16 | 4 × 2048 |" "$tree/out2/table.md" || fail "a failing test stopped the measurements"

# 3. A failing benchmark.
FAKE_MOE_FAILS=1 bash bench/gpu/run.sh "$tree/out3" > "$tree/log3" 2>&1 || fail "a failed benchmark failed the run"
grep -q "Not measured: moe: exit 3." "$tree/out3/table.md" || fail "the failed MoE benchmark is not listed"
grep -q "^| 1b | 16 | 8 × 4096 |" "$tree/out3/table.md" || fail "a failed benchmark stopped the others"

# 4. The budget. 32 s in all (10 kept for the table, a step needs 20 to start): every step runs, the
# 7b expert's (60 s here) is cut when the budget is spent; the run ends in time.
start=$SECONDS
FLEXFED_GPU_CHECK_SECONDS=32 FAKE_7B_SECONDS=60 bash bench/gpu/run.sh "$tree/out4" > "$tree/log4" 2>&1 || fail "a cut step failed the run"
((SECONDS - start <= 34)) || fail "the run took $((SECONDS - start)) s for a 32 s budget"
grep -Eq "Not measured: memory_7b: exit 124, time limit of (1|2)[0-9] s." "$tree/out4/table.md" ||
  fail "the 7b step past the budget is not listed as cut: $(grep -i 'not measured' "$tree/out4/table.md")"
grep -q "^| 7b | 8 | 4 × 2048 |" "$tree/out4/table.md" || fail "the steps before it were not measured"
# 12 s: no step can start; each is listed.
FLEXFED_GPU_CHECK_SECONDS=12 bash bench/gpu/run.sh "$tree/out4b" > "$tree/log4b" 2>&1 || fail "a spent budget failed the run"
grep -q "Not measured: kernels: not run: the check's time budget is spent." "$tree/out4b/table.md" || fail "steps not run are not listed"

# 5. A failing build stops the check, with its log.
if FAKE_BUILD_FAILS=1 bash bench/gpu/run.sh "$tree/out5" > "$tree/log5" 2>&1; then fail "a failed build did not fail the run"; fi
grep -q "the build failed" "$tree/log5" || fail "no message for the failed build"
grep -q "error: no nvcc" "$tree/out5/build.log" || fail "no build log"
[[ ! -e $tree/out5/table.md ]] || fail "a table after a failed build"
echo "run.sh: full run, failed test, failed benchmark, budget, failed build: as expected"
