"""The model oracle: Hugging Face transformers' own FlexOlmoForCausalLM / Olmo2ForCausalLM.

For several small configurations it builds the model with transformers, fills it with seeded random
weights (larger than HF's initializer, so a wrong operation shows in the logits), saves it with
`save_pretrained` (transformers' writer and tensor names: the C++ reader is checked against them),
and writes `expected.safetensors` beside it with what transformers computes:

  ids                    [2, 13] I64 input token ids
  logits                 [2, 13, V] the model's logits
  layer_input.L          [2, 13, H] what decoder layer L receives (forward pre-hooks)
  router_logits.L        [26, E] transformers' router logits (MoE cases)
  logits_excluding_1     [2, 13, V] the same ids through a model built WITHOUT expert 1 (its expert
                         and router row physically removed): what opting out must equal
  block.rms.{x,w,y}      FlexOlmoRMSNorm (eps 1e-5) on fresh inputs
  block.rope.{cos,sin,x,y}  FlexOlmoRotaryEmbedding (theta 1e4, head dim 8, 6 positions) and
                         apply_rotary_pos_emb
  block.swiglu.{x,y}     the layer-0 MLP / expert 0 on fresh inputs

One case has FlexFed's negative router bias (docs/METHOD.md §3), which transformers has no
counterpart for: there the router is transformers' FlexOlmoTopKRouter with the bias added to its
logits before the softmax (BiasedRouter below, the only FlexFed code in this file); the biases go to
`flexfed_extras.safetensors` as FlexFed writes them.

Runs offline (nothing is downloaded). Usage: hf_model_cases.py OUT_DIR
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM  # noqa: E402
from transformers.models.flex_olmo import modeling_flex_olmo as hf_flex  # noqa: E402
from transformers.models.olmo2 import modeling_olmo2 as hf_olmo2  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, attention_bias=False, hidden_act="silu",
            pad_token_id=1, bos_token_id=None, eos_token_id=0)


class BiasedRouter(hf_flex.FlexOlmoTopKRouter):
    """transformers' router plus FlexFed's negative bias: logits[:, e] += min(b_e, 0), never for e = 0."""

    def __init__(self, config, bias):
        super().__init__(config)
        effective = bias.float().clamp(max=0).clone()
        effective[0] = 0.0
        self.register_buffer("effective_bias", effective)

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight) + self.effective_bias.to(hidden_states.dtype)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value.to(router_logits.dtype), router_indices


def randomize(model, seed):
    """Seeded weights on the scale of a trained model: embeddings 0.5, matrices 0.08, norms 1 ± 0.2,
    router rows 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or "layernorm" in name:
                std, mean = 0.2, 1.0
            elif "embed_tokens" in name or name.endswith("mlp.gate.weight"):
                std, mean = 0.5, 0.0
            else:
                std, mean = 0.08, 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + mean)


def build(kind, config_kwargs, dtype, seed):
    if kind == "flex_olmo":
        config = FlexOlmoConfig(**config_kwargs)
        cls = FlexOlmoForCausalLM
    else:
        config = Olmo2Config(**config_kwargs)
        cls = Olmo2ForCausalLM
    config._attn_implementation = "eager"  # transformers' reference attention
    model = cls(config)
    randomize(model, seed)
    return model.to(dtype).eval()


def without_expert(model, j):
    """The same model built with expert j and its router row removed; k stays, as far as the
    experts left allow (opting out of j: top-k over the rest)."""
    config = FlexOlmoConfig(**model.config.to_dict())
    config.num_experts = model.config.num_experts - 1
    config.num_experts_per_tok = min(model.config.num_experts_per_tok, config.num_experts)
    config._attn_implementation = "eager"
    smaller = FlexOlmoForCausalLM(config).to(model.dtype).eval()
    keep = [e for e in range(model.config.num_experts) if e != j]
    state = {}
    for name, t in model.state_dict().items():
        per_expert = name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight",
                                    "mlp.gate.effective_bias"))
        state[name] = t[keep] if per_expert else t
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp.gate, BiasedRouter):
            smaller.model.layers[i].mlp.gate = BiasedRouter(config, layer.mlp.gate.effective_bias[keep]).to(model.dtype)
    smaller.load_state_dict(state, strict=True)
    return smaller


def run(model, ids):
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs: inputs.append(
        (kwargs.get("hidden_states") if kwargs.get("hidden_states") is not None else args[0]).clone()), with_kwargs=True)
        for layer in model.model.layers]
    try:
        out = model(ids, output_router_logits=isinstance(model, FlexOlmoForCausalLM), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out, inputs


def make_case(out_dir, name, kind, config_kwargs, dtype, seed, router_bias=None):
    torch.manual_seed(seed)
    model = build(kind, config_kwargs, dtype, seed)
    case_dir = os.path.join(out_dir, name)
    model.save_pretrained(case_dir)
    if router_bias is not None:
        extras = {}
        for i, layer in enumerate(model.model.layers):
            bias = torch.tensor(router_bias, dtype=torch.float32)
            plain = layer.mlp.gate
            layer.mlp.gate = BiasedRouter(model.config, bias).to(dtype)
            layer.mlp.gate.weight.data.copy_(plain.weight.data)
            extras[f"model.layers.{i}.mlp.router_bias"] = bias
        save_file(extras, os.path.join(case_dir, "flexfed_extras.safetensors"))
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(0, config_kwargs["vocab_size"], (2, 13), generator=g)
    expected = {"ids": ids}
    with torch.no_grad():
        out, inputs = run(model, ids)
        expected["logits"] = out.logits
        for i, h in enumerate(inputs):
            expected[f"layer_input.{i}"] = h
        if kind == "flex_olmo":
            for i, lg in enumerate(out.router_logits):
                expected[f"router_logits.{i}"] = lg
            if model.config.num_experts > 2:
                expected["logits_excluding_1"] = run(without_expert(model, 1), ids)[0].logits

        # Single blocks on fresh inputs, through transformers' modules.
        module = hf_flex if kind == "flex_olmo" else hf_olmo2
        prefix = "FlexOlmo" if kind == "flex_olmo" else "Olmo2"
        x = torch.randn(5, 24, generator=g).to(dtype)
        norm = getattr(module, prefix + "RMSNorm")(24, eps=1e-5)
        norm.weight.data = (1.0 + 0.2 * torch.randn(24, generator=g)).to(dtype)
        norm = norm.to(dtype)
        expected.update({"block.rms.x": x, "block.rms.w": norm.weight.data, "block.rms.y": norm(x)})
        rope_config = type(model.config)(**dict(BASE, head_dim=8, num_attention_heads=1, num_key_value_heads=1,
                                                hidden_size=8, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 10000.0}))
        rotary = getattr(module, prefix + "RotaryEmbedding")(rope_config)
        q = torch.randn(2, 3, 6, 8, generator=g).to(dtype)
        cos, sin = rotary(q, torch.arange(6)[None])
        y, _ = module.apply_rotary_pos_emb(q, q, cos, sin)
        expected.update({"block.rope.cos": cos[0], "block.rope.sin": sin[0], "block.rope.x": q, "block.rope.y": y})
        xs = torch.randn(7, model.config.hidden_size, generator=g).to(dtype)
        if kind == "flex_olmo":
            experts = model.model.layers[0].mlp.experts
            gate, up = experts.gate_up_proj[0].chunk(2, dim=0)
            mlp = hf_flex.FlexOlmoMLP(model.config).to(dtype)
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate.clone(), up.clone()
            mlp.down_proj.weight.data = experts.down_proj[0].clone()
        else:
            mlp = model.model.layers[0].mlp
        expected.update({"block.swiglu.x": xs, "block.swiglu.y": mlp(xs)})
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(case_dir, "expected.safetensors"))


def main():
    out_dir = sys.argv[1]
    # MoE with GQA, untied head.
    moe_gqa = dict(BASE, num_key_value_heads=2, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                   norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    make_case(out_dir, "flex_olmo_f32", "flex_olmo", moe_gqa, torch.float32, seed=1)
    # The same with FlexFed's negative router bias (mixed signs: positives clamp to 0, the public one is ignored).
    make_case(out_dir, "flex_olmo_bias_f32", "flex_olmo", moe_gqa, torch.float32, seed=5,
              router_bias=[0.7, -0.9, 0.4, -0.9])
    # Dense olmo2, tied embeddings.
    dense = dict(BASE, num_key_value_heads=4, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    make_case(out_dir, "olmo2_f32", "olmo2", dense, torch.float32, seed=2)
    # BF16 MoE with renormalised top-k and k = E.
    moe_bf16 = dict(BASE, num_key_value_heads=4, tie_word_embeddings=False, num_experts=3, num_experts_per_tok=3,
                    norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    make_case(out_dir, "flex_olmo_bf16", "flex_olmo", moe_bf16, torch.bfloat16, seed=3)
    make_case(out_dir, "olmo2_bf16", "olmo2", dict(dense, tie_word_embeddings=False), torch.bfloat16, seed=4)
    with open(os.path.join(out_dir, "DONE"), "w") as f:
        f.write("ok\n")


if __name__ == "__main__":
    main()
