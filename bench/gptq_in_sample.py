#!/usr/bin/env python3
"""How much GPTQ's error on the rows it was fitted on understates its error elsewhere: the
`gptq` sensitivity measure fits GPTQ on the rows it measures (engine/sensitivity.py).

    OMP_NUM_THREADS=1 python bench/gptq_in_sample.py MODEL_DIR > bench/results/gptq_in_sample_smollm2.txt

For units of blocks 2, 15 and 27 at 2 and 3 bits g128 (activation order): GPTQ fitted on 8 rows
(as the measure does) or on 32 others, its layer-output error tr(e H e^T) on the rows it was
fitted on ("in") and on 8 rows neither fit saw ("held"). 48 x 512 tokens of WikiText-2 valid.
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import SHARED
from crossblock.data.text import calibration_windows, read_texts, tokenize
from crossblock.engine import allocate, sensitivity
from crossblock.engine.gptq import gptq_on_grid
from crossblock.grids.uniform import UniformGrid

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = calibration_windows(tokenize(tokenizer, read_texts([SHARED / "data" / "wikitext2" / "wiki.valid.tokens"])),
                          48, 512, 0)
rows = {"fit8": ids[-8:], "fit32": ids[:32], "held": ids[32:40]}
units = [u for u in allocate.find_units(model) if u.block in (2, 15, 27)]
modules = sensitivity.dense_modules(model, units, "gptq")
hessians = {k: sensitivity.input_moments(model, modules, r, "cpu", "bf16", diagonal=False) for k, r in rows.items()}


def output_error(e, module, key):
    return float(torch.einsum("oi,ij,oj->", e, hessians[key][id(module)].h, e))


print("unit | option | fit8: in, held (held / in) | fit32: in, held (held / in)")
for unit in units:
    for bits in (2, 3):
        grid = UniformGrid(bits=bits, group_size=128, sym=False)
        cells = []
        for fit in ("fit8", "fit32"):
            inside = held = 0.0
            for module, _, p, _ in sensitivity.members(model, unit):
                w = p.data.float()
                e = w - grid.fake_quantize(*gptq_on_grid(w, hessians[fit][id(module)].h, grid, act_order=True))
                inside, held = inside + output_error(e, module, fit), held + output_error(e, module, "held")
            cells.append(f"{inside:.4g}, {held:.4g} (x{held / inside:.2f})")
        print(f"{unit.name.split('layers.')[1]} | {bits}g128 | {cells[0]} | {cells[1]}", flush=True)
