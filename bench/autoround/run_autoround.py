#!/usr/bin/env python3
"""AutoRound (SignRound) weight-only baseline for crossblock, on CPU.

Run with bench/autoround/.venv/bin/python (see setup.sh). Quantizes a local HF
folder with AutoRound on exactly the calibration windows crossblock uses and
writes a plain HF folder whose Linear weights are the fake-quantized
(quantize -> dequantize) weights, loadable without auto-round installed.

    run_autoround.py --model DIR --calib-tokens calib.safetensors --out DIR \
        --bits 2 --group-size 64 --iters 200 --nsamples 128 --seqlen 512 --batch-size 8

Defaults that come from AutoRound itself (0.16.1) and are NOT overridden here:
lr = 1/iters (2/iters for <=3 bits only when iters >= 1000), minmax_lr = lr,
min/max (clipping) tuning on, SignSGD with a linear lr decay to 0, and the
block parameters from the iteration with the lowest loss are kept
(not_use_best_mse=False), fp16 scales. AutoRound's own default is sym=True
(W4A16, group 128); this script defaults to --asym instead. lm_head (tied in our
models) is never quantized.

Calibration quirk of AutoRound itself (pre-tokenized path): the last position of
every window is left out of the block MSE loss and masked as an attention key.
Causality means this changes nothing for the other positions, so the loss covers
positions 0..seqlen-2 of each window with full context.
"""
import argparse
import json
import os
import resource
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model folder")
    p.add_argument("--calib-tokens", required=True,
                   help="safetensors file with int64 tensor 'input_ids' of shape (nsamples, seqlen)")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=4)
    p.add_argument("--group-size", type=int, choices=(16, 32, 64, -1), default=64,
                   help="-1 = one group per output row (per-channel)")
    p.add_argument("--data-type", choices=("int", "nv_fp", "mx_fp"), default="int",
                   help="nv_fp: NVFP4 (group 16), mx_fp: MXFP4 (group 32), both --sym --bits 4, weights only")
    p.add_argument("--export-ct", metavar="DIR",
                   help="also write AutoRound's own compressed-tensors export (format llm_compressor) here")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid (AutoRound's default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (this script's default)")
    p.set_defaults(sym=False)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--lr", type=float, default=None, help="default AutoRound's (1/iters); its light recipe: 5e-3 at 50 iters")
    p.add_argument("--nsamples", type=int, default=128,
                   help="use the first N rows of --calib-tokens (error if it has fewer)")
    p.add_argument("--seqlen", type=int, default=2048, help="must equal the width of --calib-tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    # On a CPU with native bf16 AutoRound would silently tune in bf16; pin fp32 by default
    # so results do not depend on the host CPU's feature flags.
    p.add_argument("--amp", action="store_true", help="let AutoRound tune in bf16 (its own default)")
    p.add_argument("--allow-unquantized", action="store_true",
                   help="do not fail when AutoRound leaves block Linear layers in full precision "
                        "(it skips int weight-only layers whose dims are not multiples of 32)")
    return p.parse_args()


class _CalibTokenizer:
    """Stand-in tokenizer: AutoRound only reads pad_token/pad_token_id on the
    pre-tokenized path. Without a pad token it guesses padding from trailing
    repeated tokens and masks them; an id that never occurs (-1) turns that off,
    so every position of every window is calibration data."""
    pad_token = "<no-pad>"
    pad_token_id = -1
    model_max_length = 1 << 30


def save_dense(qmodel, model_dir, out):
    """The fake-quantized model as a plain float32 HF folder (no auto-round config), with its tokenizer."""
    import torch
    from transformers import AutoTokenizer
    if hasattr(qmodel.config, "quantization_config"):
        del qmodel.config.quantization_config
    os.makedirs(out, exist_ok=True)
    qmodel.to(torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def load_calib(path, nsamples, seqlen):
    import torch
    from safetensors.torch import load_file

    ids = load_file(path)["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        sys.exit(f"{path}: input_ids must be a 2-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[1] != seqlen:
        sys.exit(f"{path}: windows are {ids.shape[1]} tokens long but --seqlen is {seqlen}")
    if ids.shape[0] < nsamples:
        sys.exit(f"{path}: {ids.shape[0]} windows, fewer than --nsamples {nsamples}")
    return ids[:nsamples].contiguous()


def main():
    args = parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import auto_round
    import transformers
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from transformers import AutoModelForCausalLM

    ids = load_calib(args.calib_tokens, args.nsamples, args.seqlen)
    # Batches shaped like AutoRound's own dataloader output; a list of tensors is
    # iterated as-is by its calibrator (no tokenization, truncation or shuffling).
    calib = [ids[i:i + args.batch_size] for i in range(0, len(ids), args.batch_size)]

    # float32 so the written qdq weights are exact, not re-rounded to bf16.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    ar = AutoRound(
        model,
        tokenizer=_CalibTokenizer(),
        # SignRound = AutoRound's default algorithm; everything not named here keeps its default.
        alg_configs=SignRoundConfig(bits=args.bits, group_size=args.group_size, sym=args.sym,
                                    data_type=args.data_type, iters=args.iters,
                                    **({} if args.lr is None else dict(lr=args.lr))),
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        seed=args.seed,
        dataset=calib,
        device_map="cpu",
        enable_torch_compile=False,
        amp=args.amp,
        low_cpu_mem_usage=False,  # no disk offload of blocks: we save the in-memory model
    )
    # AutoRound ignores unknown kwargs with only a warning; make sure ours took effect.
    qc = ar.quantize_config
    got = (qc.bits, qc.group_size, qc.sym, qc.data_type, qc.iters, ar.compress_context.enable_torch_compile)
    want = (args.bits, args.group_size, args.sym, args.data_type, args.iters, False)
    if got != want:
        sys.exit(f"AutoRound resolved (bits, group_size, sym, data_type, iters, compile) = {got}, wanted {want}")
    t0 = time.perf_counter()
    qmodel, layer_config = ar.quantize()
    wall = time.perf_counter() - t0

    # AutoRound's unwrapper copies the final qdq weight into each Linear's .weight
    # (scale/zp are only side attributes, not state). So the in-memory model is the
    # fake-quantized model; save it with plain transformers, no auto-round config.
    quantized = sorted(n for n, m in qmodel.named_modules()
                       if isinstance(m, torch.nn.Linear) and getattr(m, "scale", None) is not None)
    # AutoRound silently keeps some layers in FP (lm_head; any Linear with a dim not a
    # multiple of 32). A baseline that quantized fewer layers is not comparable.
    skipped = sorted(n for n, m in qmodel.named_modules()
                     if isinstance(m, torch.nn.Linear) and n not in quantized and n != "lm_head")
    if not quantized or (skipped and not args.allow_unquantized):
        sys.exit(f"AutoRound left Linear layers unquantized: {skipped}")
    for n in quantized:
        c = layer_config[n]
        if ((c["bits"], c["group_size"], c["sym"], c["data_type"]) != (args.bits, args.group_size, args.sym, args.data_type)
                or (c.get("act_bits") or 16) < 16):  # weights only
            sys.exit(f"{n} was quantized with {c}, not the requested scheme")
    save_dense(qmodel, args.model, args.out)
    if args.export_ct:  # packs the model in place: after the dense copy
        from transformers import AutoTokenizer
        ar.save_quantized(args.export_ct, format="llm_compressor")
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.export_ct)

    info = {
        "quantize_wall_s": round(wall, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "auto_round_version": auto_round.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "quantized_layers": len(quantized),
        "unquantized_layers": skipped,
        # AutoRound's resolved hyper-parameters (lr/minmax_lr are filled in during quantize()).
        "resolved": {k: str(getattr(ar.quantize_config, k, None)) for k in
                     ("lr", "minmax_lr", "enable_minmax_tuning", "not_use_best_mse", "momentum",
                      "gradient_accumulate_steps", "enable_quanted_input")}
                    | {"scale_dtype": str(ar.scale_dtype), "amp_dtype": str(ar.model_context.amp_dtype),
                       "torch_compile": ar.compress_context.enable_torch_compile},
        "calib_shape": list(ids.shape),
        "args": vars(args),
    }
    with open(os.path.join(args.out, "autoround.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
