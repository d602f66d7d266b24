"""Sums a LibTorch/PyTorch Chrome trace per operation: self time (an op's time minus the ops it
called), calls and share, heaviest first. For bench/train_bench.cpp --profile (LibTorch's Kineto
profiler) and, for the peer, torch.profiler's export_chrome_trace. A trace from a GPU also gets
the device's side: time per kernel and per kind of kernel, and how much of the traced span the
device was busy at all (what is left is time the GPU waited for the host: launches, syncs).
Usage: bench/profile_ops.py TRACE.json [--top N] [--markdown]"""

import argparse
import collections
import json
import re

# Kinds of GPU kernel, by name (cuBLAS/cuBLASLt, SDPA's flash and cuDNN backends, FlexFed's own).
KINDS = [
    ("matrix products", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|cudnn", re.I)),
    ("FlexFed MoE kernels", re.compile(r"flexfed", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
    ("reductions", re.compile(r"reduce|norm", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|copy|cat|index|gather|scatter", re.I)),
]
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
SKIPPED_CATEGORIES = {"Trace", "python_function", "cuda_runtime", "cuda_driver", "ac2g"}


def kind(name):
    for label, pattern in KINDS:
        if pattern.search(name):
            return label
    return "other"


def self_times(events):
    """Per name: (self time in µs, calls) of nested spans on each thread."""
    spans = collections.defaultdict(list)  # per thread: (start, end, name)
    for e in events:
        spans[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]))
    self_time, calls = collections.Counter(), collections.Counter()
    for seq in spans.values():
        seq.sort(key=lambda s: (s[0], -s[1]))
        stack = []  # open spans: [end, name, child time, start]

        def close(until):
            while stack and stack[-1][0] <= until:
                end, name, children, start = stack.pop()
                self_time[name] += (end - start) - children
                if stack:
                    stack[-1][2] += end - start

        for start, end, name in seq:
            close(start)
            stack.append([end, name, 0.0, start])
            calls[name] += 1
        close(float("inf"))
    return self_time, calls


def busy(intervals):
    """Time covered by the union of (start, end) intervals, and the span from first to last."""
    intervals.sort()
    covered, reach = 0.0, float("-inf")
    for start, end in intervals:
        if start > reach:
            covered += end - start
            reach = end
        elif end > reach:
            covered += end - reach
            reach = end
    return covered, (max(e for _, e in intervals) - intervals[0][0]) if intervals else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--markdown", action="store_true", help="GPU summary only, as markdown (bench/gpu/run.sh)")
    args = ap.parse_args()
    data = json.load(open(args.trace))
    events = [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    host = [e for e in events if e.get("cat") not in DEVICE_CATEGORIES and e.get("cat") not in SKIPPED_CATEGORIES]

    if not args.markdown:
        self_time, calls = self_times(host)
        total = sum(self_time.values())
        print(f"{'op (host)':<48}{'self ms':>10}{'calls':>8}{'share':>8}")
        for name, t in self_time.most_common(args.top):
            print(f"{name[:47]:<48}{t / 1e3:>10.1f}{calls[name]:>8}{t / total:>8.1%}")
        print(f"{'total':<48}{total / 1e3:>10.1f}")
    if not device:
        if args.markdown:
            print("No GPU kernels in the trace (CUPTI unavailable?).")
        return
    per_name, per_kind, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for e in device:
        per_name[e["name"]] += float(e["dur"])
        per_kind[kind(e["name"]) if e.get("cat") == "kernel" else "copies and fills"] += float(e["dur"])
        calls[e["name"]] += 1
    covered, span = busy([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device])
    total = sum(per_kind.values())
    short = lambda name: re.sub(r"\s+", " ", name)[:90].replace("|", "/")
    if args.markdown:
        print(f"GPU busy {covered / span:.1%} of the traced span ({span / 1e3:.1f} ms, {len(device)} kernels and copies; "
              f"the rest the device waited for the host).\n")
        print("| kernel kind | ms | share |\n|---|---:|---:|")
        for label, t in per_kind.most_common():
            print(f"| {label} | {t / 1e3:.2f} | {t / total:.1%} |")
        print("\n| heaviest kernels | ms | calls | share |\n|---|---:|---:|---:|")
        for name, t in per_name.most_common(args.top):
            print(f"| `{short(name)}` | {t / 1e3:.2f} | {calls[name]} | {t / total:.1%} |")
        return
    print(f"\nGPU: busy {covered / span:.1%} of {span / 1e3:.1f} ms traced; kernels and copies {total / 1e3:.1f} ms")
    print(f"{'kind':<48}{'ms':>10}{'share':>8}")
    for label, t in per_kind.most_common():
        print(f"{label:<48}{t / 1e3:>10.2f}{t / total:>8.1%}")
    print(f"{'kernel':<48}{'ms':>10}{'calls':>8}{'share':>8}")
    for name, t in per_name.most_common(args.top):
        print(f"{short(name)[:47]:<48}{t / 1e3:>10.2f}{calls[name]:>8}{t / total:>8.1%}")


if __name__ == "__main__":
    main()
