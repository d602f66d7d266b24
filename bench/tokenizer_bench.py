"""Tokenizer benchmark, the `tokenizers` side, and its set-up.

  tokenizer_bench.py prepare DIR   a corpus from local files (the Python standard library's source
                                   and Debian's license texts: code and English; nothing is
                                   downloaded) as DIR/corpus.jsonl, and a dolma2-style tokenizer
                                   (cl100k regex + byte-level BPE, 32000 tokens) trained on it by the
                                   tokenizers library as DIR/tokenizer.json
  tokenizer_bench.py measure DIR   encodes every document one after the other on one thread (the
                                   tokenizers library's single-thread throughput) and prints a JSON
                                   line: bytes, tokens, seconds (best of 3), MB/s, and the SHA-256
                                   of the ids, which the C++ side must reproduce
"""

import glob
import json
import os
import sys
import time
import hashlib

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")


def prepare(out):
    os.makedirs(out, exist_ok=True)
    files = sorted(glob.glob("/usr/lib/python3*/**/*.py", recursive=True))[:2500]
    files += sorted(glob.glob("/usr/share/common-licenses/*"))
    docs = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
        except (UnicodeDecodeError, IsADirectoryError):
            continue
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, show_progress=False, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}, f)
    print(f"prepared {len(docs)} documents, {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB, "
          f"vocabulary {tok.get_vocab_size()}", file=sys.stderr)


def measure(out):
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "corpus.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    nbytes = sum(len(d.encode()) for d in docs)
    best, digest, tokens = 1e30, hashlib.sha256(), 0
    for _ in range(3):
        start = time.perf_counter()
        encoded = [tok.encode(d, add_special_tokens=False).ids for d in docs]
        best = min(best, time.perf_counter() - start)
    for ids in encoded:
        tokens += len(ids)
        digest.update(b"".join(i.to_bytes(4, "little") for i in ids))
    print(json.dumps({"impl": "tokenizers", "threads": 1, "bytes": nbytes, "tokens": tokens, "seconds": best,
                      "mb_per_s": nbytes / best / 1e6, "ids_sha256": digest.hexdigest()}))


if __name__ == "__main__":
    {"prepare": prepare, "measure": measure}[sys.argv[1]](sys.argv[2])
