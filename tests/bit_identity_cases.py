"""The bit-identity cases: quantize stories260k with every method and hash the result.

Imported by test_bit_identity.py (the code under test) and run as a script against the reference
commit's source (`PYTHONPATH=REF/src python bit_identity_cases.py ...`), so it uses only the public
API that both have: `load_model`, `Recipe.load`, `quantize`, and the activation quantizers' record.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

SMALL = dict(nsamples=8, seqlen=64, batch_size=4)
TRAIN = dict(SMALL, iters=4)
CBQ = dict(SMALL, iters=12, lr=0.3)  # LoRA-Rounding needs more than 4 steps to leave RTN

# name -> (preset name or a file under recipes/, flat overrides)
CASES = {
    "rtn": ("rtn", dict(SMALL, wbits=3, group_size=32)),
    "rtn-clip": ("rtn", dict(SMALL, wbits=2, group_size=32, clip_search=True, sym=True)),
    "gptq": ("gptq", dict(SMALL, wbits=3, group_size=32)),
    # more sequences than an untrained recipe's error report reads (REPORT_SAMPLES)
    "rtn-32": ("rtn", dict(SMALL, nsamples=32, wbits=3, group_size=32)),
    "gptq-32": ("gptq", dict(SMALL, nsamples=32, wbits=3, group_size=32)),
    "gptq-order-clip": ("gptq", dict(SMALL, wbits=3, group_size=-1, act_order=True, clip_search=True)),
    "block": ("block", dict(TRAIN, wbits=3, group_size=32)),
    "mb": ("mb", dict(TRAIN, wbits=3, group_size=32)),
    "la": ("la", dict(TRAIN, wbits=3, group_size=32)),
    "cbq": ("cbq", dict(CBQ, wbits=3, group_size=32)),
    "block-adaround": ("block", dict(TRAIN, wbits=2, group_size=-1, rounding="adaround", lwc=False)),
    "block-adaround-soft": ("block", dict(TRAIN, wbits=2, group_size=32, rounding="adaround", ste=False)),
    "block-gptq-init": ("block", dict(TRAIN, wbits=2, group_size=32, init="gptq")),
    "block-lwc-only": ("block", dict(TRAIN, wbits=3, group_size=32, rounding="rtn", lr=0.01)),
    "block-static-a8": ("block", dict(TRAIN, wbits=4, group_size=32, abits=8, act_dynamic=False)),
    "cbq-cfp-a6": ("cbq", dict(CBQ, wbits=4, group_size=32, abits=6, cfp=True, cfp_weights=True)),
    "la-token-kl": ("la", dict(TRAIN, wbits=3, group_size=32, loss="token-mse+kl", target="homologous",
                               kl_weight=0.5, scale_dtype="float16")),
    "yaml-block-60x2-token": ("recipes/block-60x2-token.yaml", dict(SMALL, group_size=32, batch_size=2, iters=4)),
    "yaml-cbq-w4a4": ("recipes/activations/cbq-w4a4.yaml", dict(CBQ, group_size=32)),
    "yaml-cbq-w4a8": ("recipes/activations/cbq-w4a8.yaml", dict(CBQ, group_size=32)),
    "yaml-cbq-w6a6": ("recipes/activations/cbq-w6a6.yaml", dict(CBQ, group_size=32)),
}
for _name in ("rtn", "gptq", "block", "mb", "la", "cbq"):
    CASES[f"yaml-{_name}"] = (f"recipes/{_name}.yaml",
                              dict({"rtn": SMALL, "gptq": SMALL, "cbq": CBQ}.get(_name, TRAIN), wbits=3, group_size=32))


def output_hash(model) -> str:
    """Integers, scales and zero points of every quantized layer, the activation quantizers and
    the whole state dict (CFP changes norms too)."""
    from crossblock.quant.act import record
    h = hashlib.sha256()
    for name, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
        qw = getattr(module, "crossblock_qweight", None)
        if qw is not None:
            h.update(name.encode())
            for t in (qw.q, qw.scale, qw.zero):
                h.update(t.contiguous().numpy().tobytes())
    h.update(json.dumps(record(model), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def case_hash(case: str, model_dir: Path, calib: str, root: Path, **extra) -> str:
    """`root` holds the recipes/ folder of the code being run; `extra` are overrides only the
    code under test knows (e.g. a precision setting added after the reference)."""
    import crossblock as cb
    recipe, overrides = CASES[case]
    if recipe.startswith("recipes/"):
        recipe = str(root / recipe)
    model, tok = cb.load_model(str(model_dir))
    model, _ = cb.quantize(model, tok, cb.Recipe.load(recipe, **overrides, **extra), calib=calib, progress=False)
    return output_hash(model)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--root", type=Path, required=True, help="the checkout whose src/ and recipes/ run")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)  # as the tests run (conftest)
    import crossblock
    src = (args.root / "src").resolve()
    if src not in Path(crossblock.__file__).resolve().parents:
        sys.exit(f"imported crossblock from {crossblock.__file__}, not from {src}")
    calib = args.calib.read_text()
    try:  # a reference that knows --precision computes in float32, as the test side does
        crossblock.Recipe.flat(precision="fp32")
        extra = dict(precision="fp32")
    except Exception:  # an older reference has no such setting: float32 was all it had
        extra = {}
    hashes = {case: case_hash(case, args.model, calib, args.root, **extra) for case in sorted(CASES)}
    args.out.write_text(json.dumps(hashes, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
