"""Loads a FlexFed release directory as a user would — transformers' AutoModelForCausalLM and
AutoTokenizer and nothing else, offline — runs it on the token ids of a `flexfedctl logits` output
file, and compares its logits with FlexFed's. Where that file was made from texts (`--text`), the
release's own tokenizer must give the ids FlexFed gave them; and `architectures` in config.json must
name the class transformers built (vLLM picks its model by that field).

Usage: hf_release_logits.py RELEASE_DIR FLEXFED_LOGITS.safetensors [--tolerance 1e-5]
Prints the architecture transformers built, the tokenizer check and the relative error
(max |a - b| / max |b| over the real positions); exits 0 when all hold, 1 otherwise, 2 on bad input.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


def main():
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("release")
    parser.add_argument("logits")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    try:
        flexfed = load_file(args.logits)
        with safe_open(args.logits, "pt") as f:
            texts = json.loads((f.metadata() or {}).get("texts", "[]"))
        with open(os.path.join(args.release, "config.json"), encoding="utf-8") as f:
            architectures = json.load(f).get("architectures")
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        print(f"hf_release_logits: {e}", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.release, attn_implementation="eager").eval()
    ids, lengths, theirs = flexfed["ids"], flexfed["lengths"], flexfed["logits"]
    ok = True
    if architectures != [type(model).__name__]:
        print(f"config.json says architectures {architectures}, but transformers built {type(model).__name__}")
        ok = False
    if texts:
        tokenizer = AutoTokenizer.from_pretrained(args.release)
        first = ids.shape[0] - len(texts)  # the texts' sequences come last
        same = 0
        for i, text in enumerate(texts):
            hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            n = int(lengths[first + i])
            if hf_ids == ids[first + i, :n].tolist():
                same += 1
            else:
                print(f"text {i}: AutoTokenizer gives {hf_ids}, FlexFed gave {ids[first + i, :n].tolist()}")
        print(f"{type(tokenizer).__name__}: {same} of {len(texts)} texts tokenised as FlexFed did")
        ok = ok and same == len(texts)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for b in range(ids.shape[0]):
            n = int(lengths[b])
            ours = model(ids[b:b + 1, :n], use_cache=False).logits[0].double()
            ref = theirs[b, :n].double()
            worst = max(worst, (ours - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    error = worst / scale if scale > 0 else worst
    print(f"{type(model).__name__} ({model.config.model_type}, {getattr(model.config, 'num_experts', 1)} experts): "
          f"relative error {error:.3e} against flexfedctl logits (tolerance {args.tolerance:.0e})")
    return 0 if ok and error <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
