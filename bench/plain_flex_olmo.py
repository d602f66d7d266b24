"""FlexOlmo written plainly in PyTorch, the way one writes it in Python: the peer the model benchmark
(bench/model_bench.py) measures FlexFed against. Not a test oracle — the tests compare against
Hugging Face transformers (tests/oracle/). The forward follows docs/METHOD.md §2."""

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (w * x32).to(x.dtype)


def rope_tables(theta, dim, positions):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    pos = torch.arange(positions, dtype=torch.int64).float()
    freqs = (inv_freq[None, :, None] @ pos[None, None, :]).transpose(1, 2)[0]  # as HF: a matmul
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    return ((x * cos) + (rotate_half(x) * sin)).to(x.dtype)


def swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def route(x, router, bias, allowed, k, norm_topk_prob):
    logits = F.linear(x.float(), router.float())
    if bias is not None:
        b = bias.float().clamp(max=0).clone()
        b[0] = 0.0
        logits = logits + b
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
        k = min(k, int(allowed.sum()))
    probs = torch.softmax(logits, dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return logits, w, idx


def moe(x, layer, cfg, allowed):
    if cfg["model_type"] == "olmo2":
        return swiglu(x, *layer["experts"][0]), None
    logits, w, idx = route(x, layer["router"], layer.get("bias"), allowed,
                           cfg["num_experts_per_tok"], cfg.get("norm_topk_prob", False))
    out = torch.zeros_like(x)
    for e, weights in enumerate(layer["experts"]):
        pos, tok = torch.where((idx == e).T)  # (slot, token)
        if tok.numel() == 0:
            continue
        y = swiglu(x[tok], *weights)
        y = (y.float() * w[tok, pos, None]).to(x.dtype)
        out.index_add_(0, tok, y)
    return out, logits
