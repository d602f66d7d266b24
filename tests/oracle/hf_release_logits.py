"""Loads a FlexFed release directory as a user would — transformers' AutoModelForCausalLM and
nothing else, offline — runs it on the token ids of a `flexfedctl logits` output file, and compares
its logits with FlexFed's.

Usage: hf_release_logits.py RELEASE_DIR FLEXFED_LOGITS.safetensors [--tolerance 1e-5]
Prints the architecture transformers built and the relative error (max |a - b| / max |b| over the
real positions); exits 0 when it is within the tolerance, 1 otherwise, 2 on bad input.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
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
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        print(f"hf_release_logits: {args.logits}: {e}", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.release, attn_implementation="eager").eval()
    ids, lengths, theirs = flexfed["ids"], flexfed["lengths"], flexfed["logits"]
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
    return 0 if error <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
