"""Owner training-step benchmark, plain-PyTorch side: the same expert-training step as
bench/train_bench.cpp — anchor frozen (requires_grad=False), expert 1, r_i and b_i trained, top-2
of 2, cross-entropy + router z-loss, gradient clipping, torch.optim.AdamW — written plainly on
the project's .venv PyTorch (the LibTorch FlexFed links). One JSON line per configuration."""

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    cfg = config("small", 1, 1)
    anchor = make_weights(cfg, requires_grad=False)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    cfg2 = dict(cfg, model_type="flex_olmo", num_experts=2, num_experts_per_tok=2)
    trained, r_pub, r_i, b_i = [], [], [], []
    for layer in anchor["layers"]:
        expert = tuple(t.clone().requires_grad_(True) for t in layer["experts"][0])
        layer["experts"] = [layer["experts"][0], expert]
        trained += list(expert)
        r_pub.append(torch.randn(1, h))
        r_i.append(torch.randn(1, h, requires_grad=True))
        b_i.append(torch.zeros(1, requires_grad=True))
    trained += r_i + b_i
    model = Model(cfg2, anchor)
    opt = torch.optim.AdamW(trained, lr=9e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    captured = []
    import plain_flex_olmo as ref
    original_route = ref.route

    def route(*a, **k):  # keep the router logits for the z-loss
        out = original_route(*a, **k)
        captured.append(out[0])
        return out

    ref.route = route

    for batch, seq in [(4, 512), (1, 256)]:
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1))

        def step():
            for l, layer in enumerate(anchor["layers"]):
                layer["router"] = torch.cat([r_pub[l], r_i[l]])
                layer["bias"] = torch.cat([torch.zeros(1), b_i[l]])
            captured.clear()
            logits = model.forward(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg["vocab_size"]), ids[:, 1:].reshape(-1))
            z = sum(torch.logsumexp(lg, -1).pow(2).mean() for lg in captured)
            (loss + 1e-3 * z).backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        best = min(timed(step) for _ in range(4 if seq >= 512 else 12))
        print(json.dumps({"impl": "python", "tokens_per_step": batch * seq, "seconds": best,
                          "tokens_per_s": batch * seq / best,
                          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0}), flush=True)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
