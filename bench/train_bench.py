"""Owner training-step benchmark, plain-PyTorch side: the same expert-training step as
bench/train_bench.cpp — anchor frozen (requires_grad=False), expert 1, r_i and b_i trained, top-2
of 2, cross-entropy + router z-loss, gradient clipping, torch.optim.AdamW — written plainly on
the project's .venv PyTorch (the LibTorch FlexFed links) as a PyTorch user would today: eager,
scaled_dot_product_attention, and on a GPU bf16 autocast with bf16 frozen weights and fused AdamW.
One JSON line per configuration."""

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_bench import Model, config, make_weights  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 autocast on a GPU, fp32 on the CPU (as FlexFed)")
    ap.add_argument("--shape", action="append", help="BATCHxSEQ, one line each (default 4x512 and 1x256)")
    ap.add_argument("--layers", type=int, default=0, help="override the preset's layer count")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and args.device == "cuda")
    cfg = config(args.preset, 1, 1)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    cfg["max_position_embeddings"] = max([4096] + [int(s.split("x")[1]) + 1 for s in args.shape or []])
    with torch.device(device):
        anchor = make_weights(cfg, requires_grad=False)
        if bf16:  # frozen weights in bf16, as autocast would cast them every step anyway
            anchor = to_dtype(anchor, torch.bfloat16)
        h = cfg["hidden_size"]
        cfg2 = dict(cfg, model_type="flex_olmo", num_experts=2, num_experts_per_tok=2)
        trained, r_pub, r_i, b_i = [], [], [], []
        for layer in anchor["layers"]:
            expert = tuple(t.float().clone().requires_grad_(True) for t in layer["experts"][0])  # fp32 masters
            layer["experts"] = [layer["experts"][0], expert]
            trained += list(expert)
            r_pub.append(torch.randn(1, h))
            r_i.append(torch.randn(1, h, requires_grad=True))
            b_i.append(torch.zeros(1, requires_grad=True))
        trained += r_i + b_i
        model = Model(cfg2, anchor, sdpa=True)
        model.cos, model.sin = model.cos.to(device), model.sin.to(device)
    opt = torch.optim.AdamW(trained, lr=9e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            fused=args.device == "cuda")

    captured = []
    import plain_flex_olmo as ref
    original_route = ref.route

    def route(*a, **k):  # keep the router logits for the z-loss
        out = original_route(*a, **k)
        captured.append(out[0])
        return out

    ref.route = route
    shapes = [tuple(int(x) for x in s.split("x")) for s in (args.shape or ["4x512", "1x256"])]
    for batch, seq in shapes:
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), device=device)

        def step():
            for l, layer in enumerate(anchor["layers"]):
                layer["router"] = torch.cat([r_pub[l], r_i[l]])
                layer["bias"] = torch.cat([torch.zeros(1, device=device), b_i[l]])
            captured.clear()
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
                logits = model.forward(ids[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, cfg["vocab_size"]).float(), ids[:, 1:].reshape(-1))
                z = sum(torch.logsumexp(lg.float(), -1).pow(2).mean() for lg in captured)
            (loss + 1e-3 * z).backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()

        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step()
        best = min(timed(step) for _ in range(4 if batch * seq >= 2048 else 12))
        line = {"impl": "python", "preset": args.preset, "layers": cfg["num_hidden_layers"], "device": args.device, "batch": batch, "seq_len": seq, "tokens_per_step": batch * seq,
                "seconds": best, "tokens_per_s": batch * seq / best,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0}
        if args.device == "cuda":
            line["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        print(json.dumps(line), flush=True)


def to_dtype(tree, dtype):
    if isinstance(tree, dict):
        return {k: to_dtype(v, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_dtype(v, dtype) for v in tree)
    return tree.to(dtype) if tree.is_floating_point() else tree


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
