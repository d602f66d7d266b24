"""Sums a LibTorch/PyTorch Chrome trace per operation: self time (an op's time minus the ops it
called), calls and share, heaviest first. For bench/train_bench.cpp --profile and, for the peer,
torch.profiler's export_chrome_trace. Usage: bench/profile_ops.py TRACE.json [--top N]"""

import argparse
import collections
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    data = json.load(open(args.trace))
    events = data["traceEvents"] if isinstance(data, dict) else data
    spans = collections.defaultdict(list)  # per thread: (start, end, name)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            spans[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]))
    self_time, calls = collections.Counter(), collections.Counter()
    for seq in spans.values():
        seq.sort(key=lambda s: (s[0], -s[1]))
        stack = []  # open spans: [end, name, child time]
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
    total = sum(self_time.values())
    print(f"{'op':<48}{'self ms':>10}{'calls':>8}{'share':>8}")
    for name, t in self_time.most_common(args.top):
        print(f"{name[:47]:<48}{t / 1e3:>10.1f}{calls[name]:>8}{t / total:>8.1%}")
    print(f"{'total':<48}{total / 1e3:>10.1f}")


if __name__ == "__main__":
    main()
