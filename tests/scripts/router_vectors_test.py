#!/usr/bin/env python3
"""scripts/router_vectors.py: sentence-encoder rows for router-init --mode vectors, offline.

Checks, with every network connection refused: the shape [layers, hidden] and the same row in every
layer; the same inputs give the same file; the row is e_mine − e_public (zero when both are the
same text); hidden sizes above the encoder's 256 are reached by an orthonormal projection (norm
kept); bad input is refused with a one-line reason and a non-zero exit.
"""
import json
import os
import runpy
import socket
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "router_vectors.py")


def refuse(*args, **kwargs):
    raise AssertionError("router_vectors.py tried to use the network")


socket.socket.connect = refuse
socket.create_connection = refuse


def run(*args):
    sys.argv = ["router_vectors.py", *args]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def anchor(d, layers, hidden):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"num_hidden_layers": layers, "hidden_size": hidden}, f)
    return d


def main():
    t = tempfile.mkdtemp()
    code = os.path.join(t, "code.jsonl")
    prose = os.path.join(t, "prose.jsonl")
    with open(code, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + len(str(x))\n"}) + "\n")
    with open(prose, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"The {i}th traveller walked along the river and sang of the hills."}) + "\n")
    small = anchor(os.path.join(t, "small"), 3, 64)
    out = os.path.join(t, "v.safetensors")
    assert run("--anchor", small, "--data", code, "--public", prose, "--samples", "20", "--out", out) == 0
    v = load_file(out)["vectors"]
    assert v.shape == (3, 64) and v.dtype == np.float32, v.shape
    assert np.array_equal(v[0], v[2])
    assert np.linalg.norm(v[0]) > 0.1, np.linalg.norm(v[0])
    again = os.path.join(t, "again.safetensors")
    assert run("--anchor", small, "--data", code, "--public", prose, "--samples", "20", "--out", again) == 0
    assert np.array_equal(load_file(again)["vectors"], v)
    same = os.path.join(t, "same.safetensors")
    assert run("--anchor", small, "--data", prose, "--public", prose, "--samples", "40", "--out", same) == 0
    assert np.abs(load_file(same)["vectors"]).max() == 0
    # Above 256 dimensions: projected, the norm kept (the 256-dimensional row's).
    full = os.path.join(t, "full.safetensors")
    assert run("--anchor", anchor(os.path.join(t, "x256"), 1, 256), "--data", code, "--public", prose,
               "--samples", "20", "--out", full) == 0
    big = os.path.join(t, "big.safetensors")
    assert run("--anchor", anchor(os.path.join(t, "x512"), 2, 512), "--data", code, "--public", prose,
               "--samples", "20", "--out", big) == 0
    b = load_file(big)["vectors"]
    assert b.shape == (2, 512)
    assert abs(np.linalg.norm(b[0]) - np.linalg.norm(load_file(full)["vectors"][0])) < 1e-4
    # Bad input: a missing file, an anchor without config.json, a JSONL line without text.
    assert "no such file" in str(run("--anchor", small, "--data", os.path.join(t, "nope"), "--public", prose, "--out", out))
    assert "config.json" in str(run("--anchor", t, "--data", code, "--public", prose, "--out", out))
    broken = os.path.join(t, "broken.jsonl")
    with open(broken, "w") as f:
        f.write('{"body": "x"}\n')
    assert "broken.jsonl:1" in str(run("--anchor", small, "--data", broken, "--public", prose, "--out", out))
    print("router_vectors: all checks passed")


if __name__ == "__main__":
    main()
