#!/usr/bin/env python3
"""The plain-PyTorch peers (bench/model_bench.py, bench/train_bench.py) build the same model sizes as
FlexFed's presets (common/core/model_config.cpp, ModelConfig::Preset): every preset on both sides,
with the same layers, hidden size, heads, FFN width and vocabulary. Regression: the peers lacked
1b and 7b, so bench/gpu/run.sh's peer steps would have failed on a GPU machine."""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import model_bench  # noqa: E402

source = open(os.path.join(ROOT, "common", "core", "model_config.cpp")).read()
table = source[source.index("kSizes[] = {"):]
table = table[:table.index("};")]
cpp = {m.group(1): tuple(int(x) for x in m.group(2).split(","))
       for m in re.finditer(r'\{"(\w+)",\s*([\d,\s]+)\}', table)}
assert len(cpp) >= 6, f"could not read ModelConfig's presets from model_config.cpp: {cpp}"
assert cpp == model_bench.PRESETS, f"presets differ:\n  FlexFed {cpp}\n  peer    {model_bench.PRESETS}"
for name in cpp:
    cfg = model_bench.config(name, 2, 2)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == \
        (cpp[name][0], cpp[name][1], cpp[name][3], cpp[name][4]), name
print(f"{len(cpp)} presets equal: {', '.join(cpp)}")
