"""The `fake` format: dense fake-quantized weights in a plain transformers folder. Anything goes;
activation quantizers are recorded in crossblock.json (api.write_folder), not here."""
from __future__ import annotations

from .common import save_folder
from .formats import FORMATS, Format


@FORMATS.register("fake")
class Fake(Format):
    def accepts_grid(self, grid, model):
        pass  # dense weights: any grid

    def write(self, model, tokenizer, out_dir, act_scheme):
        save_folder(model, tokenizer, out_dir)
