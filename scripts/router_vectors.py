#!/usr/bin/env python3
"""Router rows from a sentence encoder, as FlexOlmo initialises them (docs/OWNER_GUIDE.md).

Usage (the project's Python environment):
  .venv/bin/python scripts/router_vectors.py --anchor ANCHOR --data MINE... --public PUBLIC... --out vectors.safetensors
then
  flexfed-owner router-init --mode vectors --vectors vectors.safetensors --public-data PUBLIC... --anchor ANCHOR --out r.safetensors

FlexOlmo sets each expert's router row to an embedding of its domain from a sentence encoder
(GritLM there), and the public expert's to that of the public data. FlexFed's published r_pub is 0
(routing depends only on differences of rows), so the owner's row is the difference: e_mine − e_public,
each the mean unit-length embedding of up to --samples sampled documents, the same vector in every
layer. Runs on your machine; reads your data and the public text, writes one small file of numbers.

The encoder is WordLlama's l2_supercat (256 dimensions, trained with Matryoshka losses), whose weights
and tokenizer ship inside the `wordllama` package: nothing is downloaded. For a hidden size of at most
256 the first `hidden` dimensions are kept (Matryoshka truncation); for larger models a seeded random
orthonormal projection maps the 256 dimensions into the hidden size (inner products kept).
"""
import argparse
import json
import os
import random
import sys

import numpy as np
from safetensors.numpy import save_file

ENCODER_DIM = 256


def encoder(dim):
    """WordLlama l2_supercat from the files in its package, truncated to `dim` (≤ 256) dimensions."""
    import wordllama
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference
    root = os.path.dirname(wordllama.__file__)
    weights = os.path.join(root, "weights", "l2_supercat_256.safetensors")
    tokenizer = os.path.join(root, "tokenizers", "l2_supercat_tokenizer_config.json")
    for path in (weights, tokenizer):
        if not os.path.exists(path):
            sys.exit(f"router_vectors.py: {path} is missing; reinstall the environment (scripts/setup.sh)")
    with safe_open(weights, framework="np") as f:
        embedding = f.get_tensor("embedding.weight")[:, :dim]
    return WordLlamaInference(embedding, Tokenizer.from_file(tokenizer))


def documents(paths, field):
    """Every document of the files (.jsonl: one per line, its `field`; else the whole file) and folders."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for d, _, names in sorted(os.walk(p)):
                files += [os.path.join(d, n) for n in sorted(names)]
        elif os.path.isfile(p):
            files.append(p)
        else:
            sys.exit(f"router_vectors.py: {p}: no such file or folder")
    docs = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as h:
            if f.endswith(".jsonl"):
                for n, line in enumerate(h, 1):
                    if line.strip():
                        try:
                            docs.append(json.loads(line)[field])
                        except (ValueError, KeyError, TypeError):
                            sys.exit(f"router_vectors.py: {f}:{n}: not a JSON object with a '{field}' string")
            else:
                docs.append(h.read())
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        sys.exit(f"router_vectors.py: no documents in {' '.join(paths)}")
    return docs


def mean_embedding(model, docs, samples, seed, max_chars):
    picked = random.Random(seed).sample(docs, min(samples, len(docs)))
    e = model.embed([d[:max_chars] for d in picked], norm=True, batch_size=64)
    return e.astype(np.float64).mean(axis=0), len(picked)


def main():
    ap = argparse.ArgumentParser(description="Router rows for router-init --mode vectors from a sentence encoder")
    ap.add_argument("--anchor", required=True, help="anchor folder (its config.json gives the layers and hidden size)")
    ap.add_argument("--data", nargs="+", required=True, help="your documents: .jsonl, text files or folders")
    ap.add_argument("--public", nargs="+", required=True, help="public text: .jsonl, text files or folders")
    ap.add_argument("--out", required=True, help="the .safetensors file to write ('vectors', [layers, hidden])")
    ap.add_argument("--samples", type=int, default=1000, help="documents sampled from each side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    ap.add_argument("--max-chars", type=int, default=4000, help="characters of each document embedded")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the row")
    a = ap.parse_args()
    if a.samples < 1 or a.max_chars < 1:
        sys.exit("router_vectors.py: --samples and --max-chars must be positive")
    try:
        with open(os.path.join(a.anchor, "config.json")) as f:
            config = json.load(f)
        layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"router_vectors.py: {a.anchor}/config.json: {e}; pass the anchor folder from `flexfed-owner pull`")
    model = encoder(min(hidden, ENCODER_DIM))
    mine, n_mine = mean_embedding(model, documents(a.data, a.text_field), a.samples, a.seed, a.max_chars)
    public, n_public = mean_embedding(model, documents(a.public, a.text_field), a.samples, a.seed + 1, a.max_chars)
    row = (mine - public) * a.scale
    if hidden > ENCODER_DIM:
        q, _ = np.linalg.qr(np.random.default_rng(a.seed).standard_normal((hidden, ENCODER_DIM)))
        row = q @ row
    vectors = np.tile(row.astype(np.float32), (layers, 1))
    tmp = a.out + ".tmp"
    save_file({"vectors": vectors}, tmp, metadata={
        "encoder": "wordllama l2_supercat", "dimensions": str(min(hidden, ENCODER_DIM)),
        "documents": f"{n_mine} yours, {n_public} public", "seed": str(a.seed), "scale": str(a.scale)})
    os.replace(tmp, a.out)
    cosine = float(mine @ public / (np.linalg.norm(mine) * np.linalg.norm(public)))
    print(f"wrote {a.out}: [{layers}, {hidden}], |row| {np.linalg.norm(row):.3f}; "
          f"cosine of your and the public mean embedding {cosine:.3f} ({n_mine} and {n_public} documents)")


if __name__ == "__main__":
    main()
