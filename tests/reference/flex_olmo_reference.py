#!/usr/bin/python3
"""Independent reference for FlexFed's model tests, in plain PyTorch (Debian's python3-torch).

It writes, for several small configurations, an HF-style checkpoint directory (config.json +
model.safetensors, plus flexfed_extras.safetensors for router biases) with random weights, and an
`expected.safetensors` with input ids, logits, per-layer hidden states, router logits and the
outputs of single blocks (RMSNorm, RoPE, SwiGLU, routing). The forward follows
../shared/design/FLEXOLMO.md §2 (HF modeling_flex_olmo.py); nothing here is shared with the C++.

It also writes its own safetensors files (struct + json), so the C++ reader is checked against a
second writer. Usage: flex_olmo_reference.py OUT_DIR
"""

import json
import os
import struct
import sys

import torch
import torch.nn.functional as F

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    """Plain safetensors writer: header JSON (offsets in insertion order), 8-byte aligned."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


# ---------------------------------------------------------------------------- the model, plainly

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


def forward(cfg, weights, ids, allowed=None):
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    b, t = ids.shape
    cos, sin = rope_tables(cfg["theta"], d, t)
    h = weights["embed"][ids]
    trace = {"layer_inputs": [], "router_logits": []}
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    for layer in weights["layers"]:
        trace["layer_inputs"].append(h)
        q = rms_norm(F.linear(h, layer["q"]), layer["q_norm"], eps).view(b, t, heads, d).transpose(1, 2)
        k = rms_norm(F.linear(h, layer["k"]), layer["k_norm"], eps).view(b, t, kv, d).transpose(1, 2)
        v = F.linear(h, layer["v"]).view(b, t, kv, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(heads // kv, dim=1)
        v = v.repeat_interleave(heads // kv, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * d ** -0.5
        scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        a = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, heads * d)
        h = h + rms_norm(F.linear(a, layer["o"]), layer["post_attn"], eps)
        m, logits = moe(h.reshape(b * t, -1), layer, cfg, allowed)
        if logits is not None:
            trace["router_logits"].append(logits)
        h = h + rms_norm(m.view(b, t, -1), layer["post_ff"], eps)
    lm_head = weights["embed"] if cfg["tie_word_embeddings"] else weights["lm_head"]
    return F.linear(rms_norm(h, weights["norm"], eps), lm_head), trace


# ---------------------------------------------------------------------------- cases

def make_case(out_dir, name, cfg, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    hidden, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    num_experts = cfg.get("num_experts", 1)

    def rnd(*shape, std=0.08):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm_w(n):  # not all ones, so a wrong norm placement shows
        return (1.0 + 0.2 * torch.randn(n, generator=g)).to(dtype)

    weights = {"embed": rnd(vocab, hidden, std=0.5), "norm": norm_w(hidden), "layers": []}
    tensors = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": weights["norm"]}
    extras = {}
    if not cfg["tie_word_embeddings"]:
        weights["lm_head"] = rnd(vocab, hidden)
        tensors["lm_head.weight"] = weights["lm_head"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {"q": rnd(heads * d, hidden), "k": rnd(kv * d, hidden), "v": rnd(kv * d, hidden),
                 "o": rnd(hidden, heads * d), "q_norm": norm_w(heads * d), "k_norm": norm_w(kv * d),
                 "post_attn": norm_w(hidden), "post_ff": norm_w(hidden), "experts": []}
        for key, hf in [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"),
                        ("q_norm", "q_norm"), ("k_norm", "k_norm")]:
            tensors[f"{p}self_attn.{hf}.weight"] = layer[key]
        tensors[p + "post_attention_layernorm.weight"] = layer["post_attn"]
        tensors[p + "post_feedforward_layernorm.weight"] = layer["post_ff"]
        for e in range(num_experts):
            gate, up, down = rnd(ffn, hidden), rnd(ffn, hidden), rnd(hidden, ffn)
            layer["experts"].append((gate, up, down))
            mlp = f"{p}mlp.experts.{e}." if cfg["model_type"] == "flex_olmo" else f"{p}mlp."
            tensors[mlp + "gate_proj.weight"] = gate
            tensors[mlp + "up_proj.weight"] = up
            tensors[mlp + "down_proj.weight"] = down
        if cfg["model_type"] == "flex_olmo":
            layer["router"] = rnd(num_experts, hidden, std=0.5)
            tensors[p + "mlp.gate.weight"] = layer["router"]
            if with_bias:
                # Mixed signs: positive entries must be clamped to 0, the public one ignored.
                layer["bias"] = torch.tensor([0.7] + [(-0.9 if e % 2 else 0.4) for e in range(1, num_experts)])
                extras[p + "mlp.router_bias"] = layer["bias"]
        weights["layers"].append(layer)

    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    config = {k: v for k, v in cfg.items() if k != "theta"}
    config["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    with open(os.path.join(case_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_safetensors(os.path.join(case_dir, "model.safetensors"), tensors, {"format": "pt"})
    if extras:
        write_safetensors(os.path.join(case_dir, "flexfed_extras.safetensors"), extras)

    ids = torch.randint(0, vocab, (2, 13), generator=g)
    expected = {"ids": ids}
    with torch.no_grad():
        logits, trace = forward(cfg, weights, ids)
        expected["logits"] = logits
        for i, h in enumerate(trace["layer_inputs"]):
            expected[f"layer_input.{i}"] = h
        for i, lg in enumerate(trace["router_logits"]):
            expected[f"router_logits.{i}"] = lg
        if num_experts > 2:
            allowed = torch.ones(num_experts, dtype=torch.bool)
            allowed[1] = False
            expected["logits_excluding_1"], _ = forward(cfg, weights, ids, allowed)

        # Single blocks on fresh inputs.
        x = torch.randn(5, 24, generator=g).to(dtype)
        w = norm_w(24)
        expected.update({"block.rms.x": x, "block.rms.w": w, "block.rms.y": rms_norm(x, w, 1e-5)})
        cos, sin = rope_tables(10000.0, 8, 6)
        q = torch.randn(2, 3, 6, 8, generator=g).to(dtype)
        expected.update({"block.rope.cos": cos, "block.rope.sin": sin, "block.rope.x": q,
                         "block.rope.y": apply_rope(q, cos, sin)})
        xs = torch.randn(7, hidden, generator=g).to(dtype)
        gate, up, down = weights["layers"][0]["experts"][0]
        expected.update({"block.swiglu.x": xs, "block.swiglu.y": swiglu(xs, gate, up, down)})
    write_safetensors(os.path.join(case_dir, "expected.safetensors"), expected)


def main():
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    base = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "head_dim": 16, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6, "attention_bias": False, "hidden_act": "silu",
            "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 0}
    # MoE with GQA, untied head, router bias, rope_theta form.
    moe_gqa = dict(base, model_type="flex_olmo", num_key_value_heads=2, tie_word_embeddings=False,
                   num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                   rope_theta=10000.0, theta=10000.0, architectures=["FlexOlmoForCausalLM"])
    make_case(out_dir, "flex_olmo_f32", moe_gqa, torch.float32, with_bias=True, seed=1)
    # Dense olmo2, tied embeddings, rope_parameters form.
    dense = dict(base, model_type="olmo2", num_key_value_heads=4, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, theta=500000.0)
    make_case(out_dir, "olmo2_f32", dense, torch.float32, with_bias=False, seed=2)
    # BF16 MoE with renormalised top-k and k = E.
    moe_bf16 = dict(base, model_type="flex_olmo", num_key_value_heads=4, tie_word_embeddings=False,
                    num_experts=3, num_experts_per_tok=3, norm_topk_prob=True,
                    rope_theta=500000.0, theta=500000.0)
    make_case(out_dir, "flex_olmo_bf16", moe_bf16, torch.bfloat16, with_bias=False, seed=3)
    dense_bf16 = dict(dense, tie_word_embeddings=False)
    make_case(out_dir, "olmo2_bf16", dense_bf16, torch.bfloat16, with_bias=False, seed=4)
    with open(os.path.join(out_dir, "DONE"), "w") as f:
        f.write("ok\n")


if __name__ == "__main__":
    main()
