"""Loads a FlexFed release directory as a user would — transformers' AutoModelForCausalLM and
AutoTokenizer and nothing else, offline — runs it on the token ids of a `flexfedctl logits` output
file, and compares its logits with FlexFed's. Where that file was made from texts (`--text`), the
release's own tokenizer must give the ids FlexFed gave them; and `architectures` in config.json must
name the class transformers built (vLLM picks its model by that field).

Usage: hf_release_logits.py RELEASE_DIR FLEXFED_LOGITS.safetensors [--tolerance 1e-5] [--fp32-reference]
Prints the architecture transformers built, the tokenizer check and the relative error
(max |a - b| / max |b| over the real positions); exits 0 when all hold, 1 otherwise, 2 on bad input.

With --fp32-reference (for a bf16 checkpoint) the reference is transformers on the checkpoint's
weights upcast to fp32, and FlexFed's bf16 logits may be off it by as much as transformers' own bf16
run is, times 1.25, plus the tolerance: two bf16 computations round differently (which products
oneDNN runs natively in bf16 depends on the CPU), so their distance from each other is no measure
of either's accuracy, while their distance from the exact product is.
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
    parser.add_argument("--fp32-reference", action="store_true",
                        help="compare with the weights upcast to fp32, against transformers' own bf16 error")
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
    def logits_of(model):
        with torch.no_grad():
            return [model(ids[b:b + 1, :int(lengths[b])], use_cache=False).logits[0].double() for b in range(ids.shape[0])]

    def distance(xs, refs):
        scale = max(r.abs().max().item() for r in refs)
        worst = max((x - r).abs().max().item() for x, r in zip(xs, refs))
        return worst / scale if scale > 0 else worst

    name = f"{type(model).__name__} ({model.config.model_type}, {getattr(model.config, 'num_experts', 1)} experts)"
    flexfed_logits = [theirs[b, :int(lengths[b])].double() for b in range(ids.shape[0])]
    if args.fp32_reference:
        own = logits_of(model)
        exact = logits_of(model.float())  # in place: the bf16 copy is not kept beside the fp32 one
        own_error, error = distance(own, exact), distance(flexfed_logits, exact)
        allowed = 1.25 * own_error + args.tolerance
        print(f"{name}: against the fp32 product, FlexFed's bf16 logits {error:.3e}, transformers' own bf16 "
              f"{own_error:.3e} (allowed {allowed:.3e}); FlexFed against transformers' bf16 {distance(flexfed_logits, own):.3e}")
        return 0 if ok and error <= allowed else 1
    error = distance(logits_of(model), flexfed_logits)
    print(f"{name}: relative error {error:.3e} against flexfedctl logits (tolerance {args.tolerance:.0e})")
    return 0 if ok and error <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
