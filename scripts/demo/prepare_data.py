#!/usr/bin/python3
"""Turns the demo's Debian packages (already extracted) into per-domain training and held-out text.

Usage: prepare_data.py EXTRACTED_ROOT KJV_TEXT OUT_DIR

Writes OUT_DIR/<domain>/train.jsonl and OUT_DIR/<domain>/heldout.jsonl (one {"text": ...} document
per line) for the domains public (fortunes), code (the Python standard library), math (metamath's
set.mm) and scripture (the King James Bible), and OUT_DIR/domains.json describing them. Every 10th
document (by position) is held out. Deterministic: the same packages give the same bytes.
"""
import json
import os
import re
import sys

MAX_BYTES = 3_000_000  # per domain, before the split: enough for the tiny model, quick to tokenise
HELDOUT_EVERY = 10


def fortunes(root):
    base = os.path.join(root, "usr/share/games/fortunes")
    docs = []
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for fortune in re.split(r"^%\s*$", text, flags=re.M):
            fortune = fortune.strip("\n")
            if len(fortune) >= 40 and "\b" not in fortune:  # skip overstruck ASCII art
                docs.append(fortune + "\n")
    return docs


def python_stdlib(root):
    base = os.path.join(root, "usr/lib/python3.11")
    docs = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "lib2to3"))
        for name in sorted(filenames):
            if name.endswith(".py") and os.path.isfile(os.path.join(dirpath, name)):
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                # Long modules are cut into pieces at blank lines so that no one file dominates.
                for piece in re.split(r"\n(?=\n(?:def |class ))", text):
                    if len(piece) >= 200:
                        docs.append(piece.strip("\n") + "\n")
    return docs


def metamath(root):
    path = os.path.join(root, "usr/share/metamath/databases/set.mm")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    # The file opens with long prose; theorems start later. Documents are runs of 40 lines.
    start = len(lines) // 4
    return ["\n".join(lines[i:i + 40]) + "\n" for i in range(start, len(lines), 40)]


def kjv(text_path):
    chapters = {}
    order = []
    with open(text_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^([1-3]?[A-Za-z]+\d+):\d+ (.*)$", line.rstrip("\n"))
            if not m:
                continue
            if m.group(1) not in chapters:
                chapters[m.group(1)] = []
                order.append(m.group(1))
            chapters[m.group(1)].append(m.group(2))
    return [" ".join(chapters[c]) + "\n" for c in order]


def spread(docs, max_bytes):
    """At most max_bytes of documents, taken evenly across the collection (keeps its variety)."""
    total = sum(len(d.encode()) for d in docs)
    if total <= max_bytes:
        return docs
    stride = total / max_bytes
    out, acc = [], 0.0
    for i, d in enumerate(docs):
        acc += 1.0
        if acc >= stride:
            acc -= stride
            out.append(d)
    return out


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: prepare_data.py EXTRACTED_ROOT KJV_TEXT OUT_DIR")
    root, kjv_text, out = sys.argv[1:]
    domains = {
        "public": ("English quotations and jokes (Debian: fortunes)", fortunes(root)),
        "code": ("Python standard library source (Debian: libpython3.11-stdlib)", python_stdlib(root)),
        "math": ("Metamath set.mm formal proofs (Debian: metamath-databases)", metamath(root)),
        "scripture": ("King James Bible (Debian: bible-kjv-text)", kjv(kjv_text)),
    }
    summary = {}
    for name, (description, docs) in domains.items():
        docs = spread(docs, MAX_BYTES)
        if len(docs) < 2 * HELDOUT_EVERY:
            sys.exit(f"prepare_data.py: domain {name}: only {len(docs)} documents; the package contents changed?")
        os.makedirs(os.path.join(out, name), exist_ok=True)
        parts = {"train": [], "heldout": []}
        for i, d in enumerate(docs):
            parts["heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY // 2 else "train"].append(d)
        for part, part_docs in parts.items():
            tmp = os.path.join(out, name, part + ".jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for d in part_docs:
                    f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            os.replace(tmp, os.path.join(out, name, part + ".jsonl"))
        summary[name] = {
            "description": description,
            "train_documents": len(parts["train"]),
            "heldout_documents": len(parts["heldout"]),
            "train_bytes": sum(len(d.encode()) for d in parts["train"]),
            "heldout_bytes": sum(len(d.encode()) for d in parts["heldout"]),
        }
    with open(os.path.join(out, "domains.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(out, "domains.json.tmp"), os.path.join(out, "domains.json"))
    for name, s in summary.items():
        print(f"  {name:10s} {s['train_documents']:6d} train docs {s['train_bytes'] / 1e6:5.2f} MB, "
              f"{s['heldout_documents']:5d} held out {s['heldout_bytes'] / 1e6:5.2f} MB")


if __name__ == "__main__":
    main()
