"""Real-size benchmark: loading an OLMo-2-shaped bf16 checkpoint and one forward pass on the CPU,
FlexFed (`flexfedctl logits`, memory-mapped loading) against Hugging Face transformers
(`AutoModelForCausalLM.from_pretrained` + forward) on the same directory and the same token ids,
each as its own process: wall time and peak resident memory (wait4), alternated, best of each.
(The other real-size steps — router-init, train, export, merge, push, pull — are timed by the slow
test `ctest -R coordinator/real_size`, which prints its table.)

Usage: bench/real_size_bench.py [--size 1b|7b] [--work DIR] [--rounds 2] [--tokens 64]
The checkpoint is made once with `flexfedctl random-checkpoint` (random weights) in WORK/anchor-SIZE.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTL = os.path.join(ROOT, "build/ctl/flexfedctl")
PYTHON = os.path.join(ROOT, ".venv/bin/python3")

HF_FORWARD = """
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor([[int(x) for x in sys.argv[2].split(",")]])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
with torch.no_grad():
    logits = model(ids, use_cache=False).logits
assert torch.isfinite(logits).all()
"""


def measured(cmd, env=None):
    """Runs cmd; returns (seconds, peak RSS bytes); exits on failure with its output."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.decode(errors='replace')}")
    return seconds, usage.ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", choices=["1b", "7b"])
    parser.add_argument("--work", default=os.path.join(ROOT, "build/real_size_bench"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    anchor = os.path.join(args.work, f"anchor-{args.size}")
    if not os.path.exists(anchor):
        s, rss = measured([CTL, "random-checkpoint", "--size", args.size, "--max-shard-mib", "2048", "--out", anchor])
        print(f"random-checkpoint --size {args.size}: {s:.1f} s, peak RSS {rss / 1e9:.2f} GB", file=sys.stderr)
    size = sum(os.path.getsize(os.path.join(anchor, f)) for f in os.listdir(anchor))
    ids = ",".join(str((i * 7919) % 100000 + 1) for i in range(args.tokens))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    best = {}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        runs = {
            "FlexFed": [CTL, "logits", anchor, "--ids", ids, "-o", os.path.join(args.work, "logits.safetensors")],
            "transformers": [PYTHON, "-c", HF_FORWARD, anchor, ids],
        }
        for name, cmd in runs.items():
            s, rss = measured(cmd, env)
            if name not in best or s < best[name][0]:
                best[name] = (s, min(rss, best.get(name, (0, rss))[1]))
    print(f"checkpoint: {args.size} shape, bf16, {size / 1e9:.2f} GB; load + forward of {args.tokens} tokens, "
          f"best of {args.rounds}")
    print(f"{'impl':<14}{'seconds':>9}{'peak RSS GB':>13}{'time ratio':>12}{'RSS ratio':>11}")
    hf = best["transformers"]
    for name, (s, rss) in best.items():
        print(f"{name:<14}{s:>9.1f}{rss / 1e9:>13.2f}{s / hf[0]:>11.2f}x{rss / hf[1]:>10.2f}x")
    print(json.dumps({k: {"seconds": v[0], "peak_rss_bytes": v[1]} for k, v in best.items()}))


if __name__ == "__main__":
    main()
