"""Model benchmark, plain-PyTorch side (the project's .venv PyTorch, the same LibTorch FlexFed links):
the same FlexOlmo model and the same measurements as bench/model_bench.cpp, written the way one
writes it in Python. The blocks come from bench/plain_flex_olmo.py, the KV cache is added here.
Prints one JSON object per measurement."""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_flex_olmo import apply_rope, moe, rms_norm, rope_tables  # noqa: E402

# (layers, hidden, heads, FFN, vocabulary): FlexFed's presets (common/core/model_config.cpp; the
# test tests/scripts/bench_presets_test.py keeps the two tables equal).
PRESETS = {"test": (2, 64, 4, 176, 259), "mini": (4, 128, 4, 344, 259), "tiny": (4, 256, 4, 688, 259),
           "small": (8, 512, 8, 1376, 259), "1b": (16, 2048, 16, 8192, 100352), "7b": (32, 4096, 32, 11008, 100352)}


def config(preset, experts, k):
    layers, hidden, heads, ffn, vocab = PRESETS[preset]
    return {"model_type": "flex_olmo" if experts > 1 else "olmo2", "num_hidden_layers": layers,
            "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": heads,
            "head_dim": hidden // heads, "intermediate_size": ffn, "vocab_size": vocab,
            "num_experts": experts, "num_experts_per_tok": k, "norm_topk_prob": False,
            "rms_norm_eps": 1e-6, "theta": 500000.0, "tie_word_embeddings": False,
            "max_position_embeddings": 4096}


def make_weights(cfg, requires_grad):
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    qd = cfg["num_attention_heads"] * cfg["head_dim"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]

    def p(*shape, ones=False):
        t = torch.ones(*shape) if ones else torch.randn(*shape) * 0.02
        return t.requires_grad_(requires_grad)

    w = {"embed": p(v, h), "norm": p(h, ones=True), "lm_head": p(v, h), "layers": []}
    for _ in range(cfg["num_hidden_layers"]):
        layer = {"q": p(qd, h), "k": p(kvd, h), "v": p(kvd, h), "o": p(h, qd), "q_norm": p(qd, ones=True),
                 "k_norm": p(kvd, ones=True), "post_attn": p(h, ones=True), "post_ff": p(h, ones=True),
                 "experts": [(p(f, h), p(f, h), p(h, f)) for _ in range(cfg["num_experts"])]}
        if cfg["model_type"] == "flex_olmo":
            layer["router"] = p(cfg["num_experts"], h)
        w["layers"].append(layer)
    return w


def params(w):
    out = [w["embed"], w["norm"], w["lm_head"]]
    for layer in w["layers"]:
        out += [layer[k] for k in ("q", "k", "v", "o", "q_norm", "k_norm", "post_attn", "post_ff")]
        out += [t for e in layer["experts"] for t in e]
        if "router" in layer:
            out.append(layer["router"])
    return out


class Model:
    """FlexOlmo forward with an optional preallocated KV cache (as FlexFed's)."""

    def __init__(self, cfg, weights, sdpa=False):
        self.cfg, self.w, self.sdpa = cfg, weights, sdpa  # sdpa: fused attention for fresh sequences
        self.cos, self.sin = rope_tables(cfg["theta"], cfg["head_dim"], cfg["max_position_embeddings"])

    def new_cache(self, batch, capacity):
        shape = (batch, self.cfg["num_key_value_heads"], capacity, self.cfg["head_dim"])
        return {"k": [torch.empty(shape) for _ in self.w["layers"]],
                "v": [torch.empty(shape) for _ in self.w["layers"]], "len": 0}

    def forward(self, ids, cache=None):
        cfg = self.cfg
        heads, kv, d, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
        b, t = ids.shape
        past = cache["len"] if cache else 0
        cos, sin = self.cos[past:past + t], self.sin[past:past + t]
        h = F.embedding(ids, self.w["embed"])
        for i, layer in enumerate(self.w["layers"]):
            q = rms_norm(F.linear(h, layer["q"]), layer["q_norm"], eps).view(b, t, heads, d).transpose(1, 2)
            k = rms_norm(F.linear(h, layer["k"]), layer["k_norm"], eps).view(b, t, kv, d).transpose(1, 2)
            v = F.linear(h, layer["v"]).view(b, t, kv, d).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache:
                cache["k"][i][:, :, past:past + t] = k
                cache["v"][i][:, :, past:past + t] = v
                k, v = cache["k"][i][:, :, :past + t], cache["v"][i][:, :, :past + t]
            if self.sdpa and past == 0:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1).transpose(1, 2).reshape(b, t, heads * d)
            else:
                scores = torch.matmul(q, k.transpose(2, 3)) * d ** -0.5
                if t > 1:
                    mask = torch.ones(t, past + t, dtype=torch.bool).triu(past + 1)
                    scores = scores.masked_fill(mask, float("-inf"))
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                a = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, heads * d)
            h = h + rms_norm(F.linear(a, layer["o"]), layer["post_attn"], eps)
            m, _ = moe(h.reshape(b * t, -1), layer, cfg, None)
            h = h + rms_norm(m.view(b, t, -1), layer["post_ff"], eps)
        if cache:
            cache["len"] = past + t
        return F.linear(rms_norm(h, self.w["norm"], eps), self.w["lm_head"])


def best_seconds(warmup, reps, fn):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(m, k, n):
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    return 2.0 * m * k * n / best_seconds(3, 10, lambda: torch.mm(a, b, out=c))


def forward_flops_per_token(cfg, context):
    h = cfg["hidden_size"]
    qd = cfg["num_attention_heads"] * cfg["head_dim"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = 2 * (h * qd * 2 + h * kvd * 2) + 2 * cfg["num_experts_per_tok"] * 3 * h * cfg["intermediate_size"]
    if cfg["model_type"] == "flex_olmo":
        per_layer += 2 * cfg["num_experts"] * h
    per_layer += 4.0 * context * qd
    return cfg["num_hidden_layers"] * per_layer + 2 * h * cfg["vocab_size"]


def train_step(name, cfg, batch, seq, gemm):
    model = Model(cfg, make_weights(cfg, requires_grad=True))
    ps = params(model.w)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)

    def step():
        logits = model.forward(inputs)
        loss = F.cross_entropy(logits.view(-1, cfg["vocab_size"]), targets)
        torch.autograd.grad(loss, ps)

    s = best_seconds(1, 5, step)
    tokens = batch * seq
    flops = 3 * forward_flops_per_token(cfg, (seq + 1) / 2) * tokens  # causal: (T+1)/2 keys on average
    return {"impl": "python", "bench": "train_step", "model": name, "tokens": tokens, "seconds": s,
            "tokens_per_s": tokens / s, "flops_per_s": flops / s, "gemm_flops_per_s": gemm,
            "gemm_fraction": flops / s / gemm}


@torch.no_grad()
def decode(name, cfg, prompt, steps):
    model = Model(cfg, make_weights(cfg, requires_grad=False))
    ids = torch.randint(0, cfg["vocab_size"], (1, prompt))

    def run():
        cache = model.new_cache(1, prompt + steps)
        logits = model.forward(ids, cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            logits = model.forward(nxt, cache)
            nxt = logits[:, 0].argmax(-1, keepdim=True)
        return time.perf_counter() - start

    run()
    s = min(run() for _ in range(5))
    return {"impl": "python", "bench": "decode", "model": name, "tokens": steps, "seconds": s,
            "tokens_per_s": steps / s}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    for name, preset, experts, k in [("tiny", "tiny", 1, 1), ("small-4x2", "small", 4, 2)]:
        cfg = config(preset, experts, k)
        gemm = gemm_rate(args.batch * args.seq, cfg["hidden_size"], cfg["intermediate_size"])
        print(json.dumps(train_step(name, cfg, args.batch, args.seq, gemm)), flush=True)
    for name, preset, experts, k in [("tiny", "tiny", 1, 1), ("tiny-4x2", "tiny", 4, 2)]:
        print(json.dumps(decode(name, config(preset, experts, k), 16, 128)), flush=True)


if __name__ == "__main__":
    main()
