"""The table of bench/gpu/run.sh (markdown, for docs/PERFORMANCE.md) from the JSON lines its steps
wrote into OUT_DIR: kernels.jsonl, moe.jsonl, elementwise.jsonl, train.jsonl (FlexFed's owner steps), peer.jsonl (the
plain PyTorch peer's), profile_1b.jsonl, and gpu.txt. A line {"failed": NAME, "why": ...} is a step
that failed or was not run; it is listed, and what the other steps measured is still shown.
Usage: bench/gpu/table.py OUT_DIR"""
import json
import pathlib
import sys

GB, GIB = 1e9, 2**30
GOALS = ("Goals (issues #6, #15): kernels ≥ 70% of copy bandwidth; router+permute+combine ≤ 10% of the layer "
         "(the share of the E=2, k=2 layer spent in the router, align, gather and combine kernels, forward and "
         "backward, timed alone); owner step ≥ 60% of the GEMM rate and ≥ 1.5× the PyTorch peer; the 1b step "
         "at 16×2048 and 8×4096 tokens within 40 GB; the whole 7b expert (checkpointing, bf16 moments) within 75 GB.")


def main():
    out = pathlib.Path(sys.argv[1])

    def load(name):
        path = out / name
        return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")] if path.exists() else []

    def measured(rows, key):
        return [r for r in rows if key in r]

    kernels, moe, train, peers = load("kernels.jsonl"), load("moe.jsonl"), load("train.jsonl"), load("peer.jsonl")
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "unknown"
    print(f"Card: {gpu}.")

    k_ok = measured(kernels, "gb_per_s")
    if k_ok:
        print(f"Copy bandwidth (device to device, read + write): {k_ok[0]['copy_gb_per_s']:.0f} GB/s.\n")
        print("| kernel | µs | GB/s | of copy | goal ≥ 70% |\n|---|---:|---:|---:|---|")
        for k in k_ok:
            print(f"| {k['kernel']} | {k['seconds'] * 1e6:.1f} | {k['gb_per_s']:.0f} | {k['of_copy']:.0%} | "
                  f"{'met' if k['of_copy'] >= 0.7 else 'not met'} |")
    glue = sum(k["seconds"] for k in k_ok if not k["kernel"].startswith(("swiglu", "adamw")))  # the MoE's routing
    if measured(moe, "speedup"):
        print("\n| MoE layer fwd+bwd | tokens | LibTorch ms | kernels ms | speed-up | expert TFLOP/s | "
              "router+permute+combine share (goal ≤ 10%) |\n|---|---:|---:|---:|---:|---:|---:|")
        for m in measured(moe, "speedup"):
            same = k_ok and (m["experts"], m["top_k"]) == (k_ok[0]["experts"], k_ok[0]["top_k"])
            share = f"{glue / m['dispatch_seconds']:.1%}" if same else "—"
            print(f"| E={m['experts']}, k={m['top_k']} | {m['tokens']} | {m['libtorch_seconds'] * 1e3:.2f} | "
                  f"{m['dispatch_seconds'] * 1e3:.2f} | {m['speedup']:.2f}× | {m['dispatch_tflops']:.0f} | {share} |")

    elementwise = measured(load("elementwise.jsonl"), "speedup")
    if elementwise:
        print("\n| fused op (fwd+bwd; AdamW: one step) | shape | fused ms | ATen composition ms | speed-up |\n"
              "|---|---|---:|---:|---:|")
        for e in elementwise:
            print(f"| {e['op']} | {' × '.join(map(str, e['shape']))} | {e['fused_seconds'] * 1e3:.3f} | "
                  f"{e['aten_seconds'] * 1e3:.3f} | {e['speedup']:.2f}× |")

    # The peer keeps every activation; a FlexFed row with checkpointing is compared with it all the same.
    def shape(r):
        return r["preset"], r["layers"], r["batch"], r["seq_len"]

    peer = {shape(p): p for p in measured(peers, "tokens_per_s")}
    print("\n| owner step | layers | batch × seq | FlexFed tokens/s | PyTorch peer tokens/s | ratio (goal ≥ 1.5×) | "
          "FlexFed MFU (goal ≥ 60%) | peak GiB (plan) | reserved GiB | memory goal | peer peak GiB |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for t in measured(train, "tokens_per_s"):
        name = (t["preset"] + (", checkpointing" if t.get("activation_checkpointing") else "")
                + (", bf16 moments" if t.get("optimizer_moments") == "bf16" else ""))
        p = peer.get(shape(t))
        peak = t.get("peak_device_bytes")
        goal = "—"
        if peak is not None and t["preset"] == "1b" and t["tokens_per_step"] >= 32768:
            goal = f"≤ 40 GB: {'met' if peak <= 40 * GB else 'not met'}"
        elif peak is not None and t["preset"] == "7b" and t["layers"] == 32:
            goal = f"≤ 75 GB: {'met' if peak <= 75 * GB else 'not met'}"
        gib = lambda b: "—" if b is None else f"{b / GIB:.1f}"
        ratio = f"{p['tokens_per_s']:.0f} | {t['tokens_per_s'] / p['tokens_per_s']:.2f}×" if p else "— | —"
        print(f"| {name} | {t['layers']} | {t['batch']} × {t['seq_len']} | {t['tokens_per_s']:.0f} | {ratio} | "
              f"{t['mfu']:.1%} of {t['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s | {gib(peak)} ({gib(t.get('planned_bytes'))}) | "
              f"{gib(t.get('peak_reserved_bytes'))} | {goal} | {gib(p.get('peak_device_bytes')) if p else '—'} |")
    for rows in (kernels, moe, load("elementwise.jsonl"), train, peers, load("profile_1b.jsonl")):
        for r in rows:
            if "failed" in r:
                print(f"\nNot measured: {r['failed']}: {r['why']}.")
    print("\n" + GOALS)


if __name__ == "__main__":
    main()
