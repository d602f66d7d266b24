#!/usr/bin/python3
"""Turns the demo's Debian packages (already extracted) into per-domain training and held-out text.

Usage: prepare_data.py EXTRACTED_ROOT KJV_TEXT WEB_TEXT OUT_DIR [--large]

Writes OUT_DIR/<domain>/train.jsonl and OUT_DIR/<domain>/heldout.jsonl (one {"text": ...} document
per line) for the domains public (fortunes), code (the Python standard library), math (metamath's
set.mm) and scripture (the King James Bible), and OUT_DIR/domains.json describing them. Every 10th
document (by position) is held out. OUT_DIR/mixed/heldout.jsonl holds mixed-domain documents: pieces of
about PIECE_BYTES cut from the held-out text of every domain, in a seeded random order, so that one
sequence needs several skills at once (the paper's multi-skill tasks, in miniature). Deterministic:
the same packages give the same bytes.

With --large (bench/reproduce.sh), the public domain also holds the GNU Collaborative International
Dictionary of English (Debian: dict-gcide; one entry per document, its markup and source tags
removed), up to LARGE_PUBLIC_BYTES: public text of tens of MB for a BPE anchor.

OUT_DIR/proxy/train.jsonl is the operator's public proxy text for router tuning (paper §3.3;
`flexfedctl router-tune`): public text that looks like each domain, none of it any owner's data —
Python source of another project (Debian: python3-docutils) for code, another Metamath database
(iset.mm, intuitionistic set theory) for math, the World English Bible's deuterocanonical books
(Debian: sword-text-web; WEB_TEXT, their OSIS text from `diatheke`) for scripture, and a sample of
the public training text — PROXY_BYTES of each, shuffled together (seeded).
"""
import json
import os
import random
import re
import sys

MAX_BYTES = 3_000_000  # per domain, before the split: enough for the tiny model, quick to tokenise
LARGE_PUBLIC_BYTES = 40_000_000
HELDOUT_EVERY = 10
PIECE_BYTES = 128      # a mixed document's pieces: two or more domains in every 256-byte sequence
PIECES_PER_DOC = 8
MIXED_DOCS = 240
PROXY_BYTES = 400_000  # per domain of the router-tuning proxy text


def pieces(docs, size):
    """The documents' text cut into pieces of about `size` bytes, each ending at a space or newline."""
    text = "".join(docs)
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        cut = max(text.rfind(" ", start + size // 2, end), text.rfind("\n", start + size // 2, end))
        end = cut + 1 if cut > 0 and end < len(text) else end
        out.append(text[start:end])
        start = end
    return out


def write_jsonl(path, docs):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


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


def gcide(root):
    """Dictionary entries as plain English: a new entry starts at a line without indentation."""
    import gzip
    with gzip.open(os.path.join(root, "usr/share/dictd/gcide.dict.dz")) as f:  # dictzip is gzip
        text = f.read().decode("utf-8", errors="replace")
    docs, entry = [], []
    def flush():
        body = "\n".join(entry).strip()
        if len(body) >= 80:
            docs.append(body + "\n")
        entry.clear()
    for line in text.split("\n"):
        if line.strip() in ("[1913 Webster]", "[WordNet 1.5]", "[PJC]") or re.fullmatch(r"\s*\[[^\]]*\]\s*", line):
            continue  # source tags
        if line and not line[0].isspace():
            flush()
        line = re.sub(r"\{([^}]*)\}", r"\1", line)       # {cross references}
        line = re.sub(r"\\([^\\]*)\\", r"(\1)", line)   # \Pro*nun"ci*a`tion\
        entry.append(line.rstrip())
    flush()
    return docs[1:]  # the first entry is the database's own header


def python_sources(base):
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


def python_stdlib(root):
    return python_sources(os.path.join(root, "usr/lib/python3.11"))


def metamath(root, database="set.mm"):
    path = os.path.join(root, "usr/share/metamath/databases", database)
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


def web_deuterocanon(text_path):
    """Chapters of diatheke's OSIS output ("Book C:V: text<milestone .../>" per verse), markup removed."""
    chapters = {}
    with open(text_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^(.+? \d+):\d+: (.*)$", line.rstrip("\n"))
            if not m:
                continue
            verse = re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", m.group(2))).strip()
            if verse:
                chapters.setdefault(m.group(1), []).append(verse)
    return [" ".join(verses) + "\n" for verses in chapters.values()]


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
    args = [a for a in sys.argv[1:] if a != "--large"]
    large = "--large" in sys.argv[1:]
    if len(args) != 4:
        sys.exit("usage: prepare_data.py EXTRACTED_ROOT KJV_TEXT WEB_TEXT OUT_DIR [--large]")
    root, kjv_text, web_text, out = args
    domains = {
        "public": ("English quotations and jokes (Debian: fortunes)"
                   + (" and dictionary entries (Debian: dict-gcide)" if large else ""), fortunes(root)),
        "code": ("Python standard library source (Debian: libpython3.11-stdlib)", python_stdlib(root)),
        "math": ("Metamath set.mm formal proofs (Debian: metamath-databases)", metamath(root)),
        "scripture": ("King James Bible (Debian: bible-kjv-text)", kjv(kjv_text)),
    }
    summary = {}
    heldout = {}
    train = {}
    for name, (description, docs) in domains.items():
        if large and name == "public":  # shuffled (seeded): held out and trained on alike
            docs = docs + gcide(root)
            random.Random(1).shuffle(docs)
            docs = spread(docs, LARGE_PUBLIC_BYTES)
        else:
            docs = spread(docs, MAX_BYTES)
        if len(docs) < 2 * HELDOUT_EVERY:
            sys.exit(f"prepare_data.py: domain {name}: only {len(docs)} documents; the package contents changed?")
        os.makedirs(os.path.join(out, name), exist_ok=True)
        parts = {"train": [], "heldout": []}
        for i, d in enumerate(docs):
            parts["heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY // 2 else "train"].append(d)
        for part, part_docs in parts.items():
            write_jsonl(os.path.join(out, name, part + ".jsonl"), part_docs)
        heldout[name] = parts["heldout"]
        train[name] = parts["train"]
        summary[name] = {
            "description": description,
            "train_documents": len(parts["train"]),
            "heldout_documents": len(parts["heldout"]),
            "train_bytes": sum(len(d.encode()) for d in parts["train"]),
            "heldout_bytes": sum(len(d.encode()) for d in parts["heldout"]),
        }
    # Mixed-domain documents from the held-out text only: each piece's domain drawn at random.
    rng = random.Random(0)
    streams = {name: pieces(docs, PIECE_BYTES) for name, docs in heldout.items()}
    cursor = {name: 0 for name in streams}
    mixed = []
    for _ in range(MIXED_DOCS):
        doc = []
        for _ in range(PIECES_PER_DOC):
            name = rng.choice(sorted(streams))
            doc.append(streams[name][cursor[name] % len(streams[name])])
            cursor[name] += 1
        mixed.append("".join(doc))
    os.makedirs(os.path.join(out, "mixed"), exist_ok=True)
    write_jsonl(os.path.join(out, "mixed", "heldout.jsonl"), mixed)
    summary["mixed"] = {
        "description": f"held-out pieces of about {PIECE_BYTES} bytes from every domain, {PIECES_PER_DOC} per document",
        "heldout_documents": len(mixed),
        "heldout_bytes": sum(len(d.encode()) for d in mixed),
    }
    # The router-tuning proxy: public look-alikes of each domain, never an owner's documents.
    proxies = {
        "public": ("a sample of the public training text", train["public"]),
        "code": ("Docutils' Python source (Debian: python3-docutils)",
                 python_sources(os.path.join(root, "usr/lib/python3/dist-packages/docutils"))),
        "math": ("Metamath iset.mm, intuitionistic set theory (Debian: metamath-databases)", metamath(root, "iset.mm")),
        "scripture": ("the World English Bible's deuterocanonical books (Debian: sword-text-web)",
                      web_deuterocanon(web_text)),
    }
    proxy, sources = [], {}
    for name, (description, docs) in proxies.items():
        docs = spread(docs, PROXY_BYTES)
        if len(docs) < 20:
            sys.exit(f"prepare_data.py: proxy for {name}: only {len(docs)} documents; the package contents changed?")
        proxy += docs
        sources[name] = {"description": description, "documents": len(docs),
                         "bytes": sum(len(d.encode()) for d in docs)}
    random.Random(2).shuffle(proxy)
    os.makedirs(os.path.join(out, "proxy"), exist_ok=True)
    write_jsonl(os.path.join(out, "proxy", "train.jsonl"), proxy)
    summary["proxy"] = {
        "description": "public proxy text for router tuning: a look-alike of every domain, no owner's data",
        "train_documents": len(proxy),
        "train_bytes": sum(s["bytes"] for s in sources.values()),
        "sources": sources,
    }
    with open(os.path.join(out, "domains.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(out, "domains.json.tmp"), os.path.join(out, "domains.json"))
    for name, s in summary.items():
        if name == "mixed":
            print(f"  {name:10s} {s['heldout_documents']:5d} held-out docs {s['heldout_bytes'] / 1e6:5.2f} MB ({s['description']})")
            continue
        if name == "proxy":
            print(f"  {name:10s} {s['train_documents']:6d} docs {s['train_bytes'] / 1e6:5.2f} MB for router tuning ("
                  + ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in s["sources"].items()) + ")")
            continue
        print(f"  {name:10s} {s['train_documents']:6d} train docs {s['train_bytes'] / 1e6:5.2f} MB, "
              f"{s['heldout_documents']:5d} held out {s['heldout_bytes'] / 1e6:5.2f} MB")


if __name__ == "__main__":
    main()
