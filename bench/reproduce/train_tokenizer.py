#!/usr/bin/env python3
"""Trains the reproduction's tokenizer: byte-level BPE with OLMo-2's (dolma2 / cl100k) pre-tokenizer,
on the public text only, with the Hugging Face `tokenizers` library (docs/EVALUATION.md, "The
reproduction run").

Usage: train_tokenizer.py --vocab 8192 --out DIR PUBLIC.jsonl [...]

Writes DIR/tokenizer.json and DIR/tokenizer_config.json (EOS <|endoftext|>, pad <|pad|>, no BOS),
the files an OLMo-2 checkpoint carries and `flexfed-owner train --pretrain --tokenizer DIR` takes.
Deterministic: the same text gives the same file.
"""
import argparse
import json
import os
import sys

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# OLMo-2's pre-tokenizer split (the cl100k pattern).
CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def documents(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size, special tokens included")
    ap.add_argument("--out", required=True, help="folder to write tokenizer.json and tokenizer_config.json to")
    ap.add_argument("inputs", nargs="+", help=".jsonl files with a 'text' field")
    a = ap.parse_args()
    if a.vocab < 512:
        sys.exit("train_tokenizer.py: --vocab must be at least 512 (256 byte symbols, specials, merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, min_frequency=2, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents(a.inputs), trainer=trainer)
    os.makedirs(a.out, exist_ok=True)
    for name, text in (("tokenizer.json", tok.to_str()),
                       ("tokenizer_config.json", json.dumps({"bos_token": None, "eos_token": "<|endoftext|>",
                                                              "pad_token": "<|pad|>"}))):
        tmp = os.path.join(a.out, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(a.out, name))
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {a.out}")


if __name__ == "__main__":
    main()
