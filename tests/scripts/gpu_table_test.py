#!/usr/bin/env python3
"""bench/gpu/table.py reads what the real benchmarks print: FlexFed's owner step
(flexfed_train_bench, and its --elementwise lines), the plain-PyTorch peer (bench/train_bench.py) and the MoE layer benchmark
(flexfed_moe_bench) are run here on the CPU at the `test` size and their JSON lines, named as
bench/gpu/run.sh names them, go through the table. The kernel benchmark needs a GPU: its lines are
written by hand in its format. Checks: a FlexFed row beside the peer's with their ratio, the
checkpointed row, the MoE row, a failed step listed. (A GPU machine runs the table once in a long
while; a field renamed on one side must fail here, not there.)
Usage: gpu_table_test.py TRAIN_BENCH MOE_BENCH"""
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
train_bench, moe_bench = sys.argv[1], sys.argv[2]


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


with tempfile.TemporaryDirectory() as out:
    write = lambda name, text: open(os.path.join(out, name), "w").write(text)
    write("gpu.txt", "CPU (test)")
    write("kernels.jsonl", "".join(json.dumps({"kernel": k, "seconds": 1e-5, "gb_per_s": 3000.0, "of_copy": 0.75,
                                                "copy_gb_per_s": 4000.0, "experts": 2, "top_k": 2}) + "\n"
                                    for k in ("router", "align", "gather", "combine", "swiglu", "swiglu_backward")))
    write("moe.jsonl", run(moe_bench, "--device", "cpu", "--tokens", "64", "--hidden", "32", "--ffn", "48",
                           "--experts", "2x2", "--reps", "1", "--threads", "1"))
    write("elementwise.jsonl", run(train_bench, "--threads", "1", "--preset", "test", "--layers", "1", "--elementwise",
                                   "--shape", "2x16"))
    train = run(train_bench, "--threads", "1", "--preset", "test", "--shape", "2x16")
    train += run(train_bench, "--threads", "1", "--preset", "test", "--shape", "2x16", "--activation-checkpointing",
                 "--optimizer-moments", "bf16")
    write("train.jsonl", train + json.dumps({"failed": "memory_7b", "why": "exit 124, time limit of 44 s"}) + "\n")
    write("peer.jsonl", run(sys.executable, os.path.join(ROOT, "bench", "train_bench.py"), "--threads", "1",
                            "--preset", "test", "--shape", "2x16"))
    table = run(sys.executable, os.path.join(ROOT, "bench", "gpu", "table.py"), out)

rows = [l for l in table.splitlines() if l.startswith("| test")]
assert len(rows) == 2, table
plain, compact = rows
assert plain.startswith("| test | 2 | 2 × 16 | ") and plain.count("×") == 2, plain  # the shape and the ratio
assert compact.startswith("| test, checkpointing, bf16 moments | 2 | 2 × 16 | "), compact
assert re.search(r"\| E=2, k=2 \| 64 \| [\d.]+ \| [\d.]+ \| [\d.]+× \| \d+ \| [\d.]+% \|", table), table
assert "Not measured: memory_7b: exit 124, time limit of 44 s." in table, table
assert "| swiglu_backward | 10.0 | 3000 | 75% | met |" in table, table
assert re.search(r"\| rms_norm \| 32 × 64 \| [\d.]+ \| [\d.]+ \| [\d.]+× \|", table), table
assert re.search(r"\| adamw_bf16_moments \| 1 × \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+× \|", table), table
print(table)
