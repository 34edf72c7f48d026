"""Command line: a thin skin over the Python API. Bad input exits 2 with one line on stderr."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import type_name
from .errors import CrossblockError
from .export import FORMATS
from .flat import flat_settings
from .recipe import PRESETS, Recipe
from .stages import Cfp

def recipe_flags() -> dict:
    """The flat recipe settings that are flags: all but the recipe's name."""
    return {name: s for name, s in flat_settings(Recipe).items() if name != "name"}


def flag_help(s) -> str:
    """A setting's help, choices and flat default, as its dataclass field declares them."""
    extra = [f"one of {', '.join(map(str, s.choices))}"] if s.choices else []
    if s.default is not None and s.default != []:
        extra.append(f"default {str(s.default).lower() if isinstance(s.default, bool) else s.default}"
                     + (": off" if s.picks and type(s.default) is int and s.default == 0 else ""))
    text = s.help.rstrip(".") + (f" ({'; '.join(extra)})" if extra else "")
    return text.replace("%", "%%")  # argparse formats help with %


def add_recipe_options(p: argparse.ArgumentParser):
    """One option per flat recipe setting (flat.flat_settings: e.g. --wbits, --group-size,
    --lookahead), help and type from the dataclass field that declares it; unset ones keep the
    recipe's value."""
    p.add_argument("--recipe", default=None, help=f"a preset ({', '.join(PRESETS)}), a YAML file, or auto (measure "
                                                  "the window schedules on a prefix of the model and run the best); "
                                                  "default: the best recipe measured for the bits (recipe.DEFAULTS)")
    group = p.add_argument_group("recipe settings", "each overrides the recipe's value; the defaults shown are "
                                 "those of a recipe of flags alone (a preset or file sets its own, e.g. best: "
                                 "--iters 60 --batch-size 2 --loss token-mse)")
    for name, s in recipe_flags().items():
        flag = "--" + name.replace("_", "-")
        kind = type_name(s.hint)
        if s.hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=flag_help(s))
        elif kind.startswith("a list"):
            group.add_argument(flag, type=lambda v: [x for x in v.split(",") if x], default=None, help=flag_help(s))
        else:
            base = float if "finite number" in kind else int if "integer" in kind else str
            group.add_argument(flag, type=base, default=None, help=flag_help(s))


def add_trust_remote_code(p: argparse.ArgumentParser):
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code a model folder names in its config (auto_map); without it, that code never runs")


def add_auto_budget(p: argparse.ArgumentParser):
    p.add_argument("--auto-budget", type=float, default=None,
                   help="--recipe auto: the schedule comparison's planned cost as a fraction of the full run's "
                        "(default 0.15)")


def recipe_from_args(args, name: str | None = None) -> Recipe:
    overrides = {name: getattr(args, name) for name in recipe_flags() if getattr(args, name, None) is not None}
    name = name or args.recipe
    budget = getattr(args, "auto_budget", None)
    if budget is not None and name != "auto":
        raise CrossblockError("--auto-budget applies to --recipe auto only")
    if name == "auto":
        from .auto import DEFAULT_BUDGET, AutoRecipe
        return AutoRecipe.build(DEFAULT_BUDGET if budget is None else budget, **overrides)
    if name is None:
        return Recipe.default(**overrides)
    return Recipe.load(name, **overrides)


def auto_table(info: dict) -> str:
    """The candidates as measured, ranked, and what the choice cost and reused."""
    from .compare import compare_table
    fid = info["fidelity"]
    return "\n".join([
        compare_table(info["candidates"]),
        f"chose {info['chosen']}: comparison {info['compare_block_passes']:,} block passes "
        f"({info['compare_block_passes'] / info['full_block_passes']:.1%} of the full run's "
        f"{info['full_block_passes']:,}; budget {info['budget']:.0%}), {fid['iters']} steps on {fid['nsamples']} "
        f"sequences, {info['compare_seconds']:.0f} s; reused {info['reused_windows']} window(s)"])


def cmd_quantize(args):
    from . import api
    report = api.quantize_folder(args.model, args.calib, args.out, recipe_from_args(args), format=args.format,
                                 dtype=args.dtype, save_dtype=args.save_dtype, device=args.device,
                                 overwrite=args.overwrite, resume=args.resume, offload=args.offload,
                                 progress=not args.quiet, trust_remote_code=args.trust_remote_code,
                                 low_memory=args.low_memory, calib_mix=args.calib_mix)
    if not report:  # a data-parallel rank other than 0, or a resumed run that was already complete
        return
    if report.get("auto"):
        print(auto_table(report["auto"]))
    elif report.get("recipe_chosen_by"):
        chosen = report["recipe_chosen_by"]
        left = "".join(f"; without its {k[:-len('_dropped')]}: {why}" for k, why in chosen.items() if k.endswith("_dropped"))
        print(f"recipe {report['recipe']['name']}: the default for {chosen['default_for']} ({chosen['why']}{left})")
    last = report["blocks"][-1]
    print(f"wrote {args.out} ({args.format}); last block output rel. MSE {last['rel_mse']:.4g}"
          + (f" (RTN {last['rtn']['rel_mse']:.4g})" if "rtn" in last else "")
          + f"; {report['wall_seconds']:.1f} s, peak RSS {report['peak_rss_mib']:.0f} MiB")


def cmd_preprocess(args):
    from .api import preprocess_folder
    from .recipe import Data
    from .stages import Cfp, Rotate

    data = Data(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=min(8, args.nsamples))
    cfp = Cfp(args.cfp_alpha, args.cfp_weights).validated()
    rotate = Rotate(seed=args.rotate_seed, online=args.rotate_online).validated() if args.rotate else None
    found = preprocess_folder(args.model, args.calib, Path(args.out), cfp.alpha, cfp.weights, data, args.skip or [],
                              device=args.device, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet,
                              trust_remote_code=args.trust_remote_code, rotate=rotate, cfp=args.cfp)
    done = []
    if rotate is not None:
        done.append("rotated" + (" (a run-time rotation before down_proj, folded for plain transformers)"
                                 if rotate.online else ""))
    if args.cfp:
        channels = sum(sum(b["outlier_channels"].values()) for b in found)
        weights = sum(sum(b["outlier_weights"].values()) for b in found)
        done.append(f"{channels} outlier channels scaled, {weights} outlier weights truncated over {len(found)} "
                    f"blocks (per block: {args.out}/cfp.json)")
    print(f"wrote {args.out}: " + "; ".join(done))


def cmd_eval(args):
    from . import api
    from .data.text import read_texts

    if args.reference and not args.ppl:
        raise CrossblockError("--reference compares on a text: add --ppl FILE")
    if not args.ppl and args.tasks is None:
        raise CrossblockError("eval needs --ppl FILE(s) and/or --tasks NAME[,NAME...]")
    tasks = None
    if args.tasks is not None:  # checked before the model loads: the numbers, lm-eval installed, every task known
        from .eval import tasks as zero_shot
        from .validate import check_task_options
        check_task_options(args.limit, args.num_fewshot, args.task_batch_size)
        zero_shot.require_lm_eval()
        if not args.tasks:
            raise CrossblockError("--tasks needs at least one task name (comma-separated)")
        zero_shot.task_specs(args.tasks, args.task_dir or (), args.trust_task_dir)
    text = read_texts(args.ppl) if args.ppl else None
    device = args.device or api.default_device()
    model = api.load(args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    tokenizer = api.load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    reference = api.load(args.reference, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code) \
        if args.reference else None
    figures = api.evaluate(model, tokenizer, text, args.seqlen, args.max_windows, progress=not args.quiet,
                           reference=reference) if text else None
    ppl = figures["ppl"] if isinstance(figures, dict) else figures
    if args.tasks is not None:
        tasks = zero_shot.run_tasks(model, tokenizer, args.tasks, args.task_dir or (), batch_size=args.task_batch_size,
                                    limit=args.limit, num_fewshot=args.num_fewshot, progress=not args.quiet,
                                    trust_task_dir=args.trust_task_dir)
    if args.json:
        result = dict(figures) if isinstance(figures, dict) else ({"ppl": ppl} if ppl is not None else {})
        print(json.dumps({**result, **({"tasks": tasks} if tasks is not None else {})}))
    elif isinstance(figures, dict):
        print(f"{'text':<24} {'ppl':>10} {'ppl FP':>10} {'KL(FP||Q)':>10} {'top-1':>7} {'tokens':>8}")
        print(f"{Path(args.ppl[0]).name:<24} {figures['ppl']:>10.4f} {figures['ppl_reference']:>10.4f} "
              f"{figures['kl']:>10.5f} {figures['top1']:>7.4f} {figures['tokens']:>8}")
    elif tasks is None:
        print(f"perplexity {ppl:.4f}")
    if tasks is not None and not args.json:
        print(zero_shot.task_table(tasks, {Path(args.ppl[0]).name: ppl} if ppl is not None else None))


def cmd_plan(args):
    from .engine.plan import plan_table
    from transformers import AutoConfig

    recipe = recipe_from_args(args)
    try:
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        from .api import first_line
        raise CrossblockError(f"cannot read the config of {args.model}: {first_line(e)}") from None
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not layers:
        raise CrossblockError(f"cannot tell the number of blocks of {args.model} from its config")
    from .auto import AutoRecipe
    if isinstance(recipe, AutoRecipe):
        print(recipe.plan_text(layers))
        recipe = recipe.candidates()[0]
    print(plan_table(recipe, layers))


def cmd_compare(args):
    from .compare import compare, compare_table
    from .data.calibration import calibration_source

    recipes = [recipe_from_args(args, name) for name in args.recipe.split(",") if name]
    if not recipes:
        raise CrossblockError("--recipe needs at least one preset or YAML file (comma-separated)")
    from .auto import AutoRecipe
    if any(isinstance(r, AutoRecipe) for r in recipes):  # it would compare on a prefix of the cut model
        raise CrossblockError("compare cannot run auto: auto is itself a comparison (of block, la, mb, cbq on a "
                              "prefix); compare those directly, e.g. --recipe block,la,mb,cbq")
    rows = compare(args.model, recipes, calibration_source(args.calib)[0], args.blocks, args.device, progress=not args.quiet,
                   trust_remote_code=args.trust_remote_code)
    print(compare_table(rows))


def cmd_report(args):
    from .report import write_report
    print(write_report(Path(args.out), plot=not args.no_plot))


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossblock", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write an HF folder")
    q.add_argument("--model", required=True, help="a local HF folder or a hub id")
    q.add_argument("--calib", nargs="+", default=None, help="calibration text: files, folders of .txt files, or builtin (the built-in mixed set, the default)")
    q.add_argument("--calib-mix", nargs="+", type=float, default=None, metavar="WEIGHT",
                   help="one weight per --calib entry: each entry gives that share of the calibration windows")
    q.add_argument("--out", required=True)
    q.add_argument("--format", choices=FORMATS.names(), default="fake")
    q.add_argument("--dtype", default="float32", help="dtype to load and compute in (default float32)")
    q.add_argument("--save-dtype", default="auto", help="dtype of the saved weights (default: the model's)")
    q.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT (or interrupted run)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from its last window")
    q.add_argument("--offload", choices=("ram", "disk"), default="ram",
                   help="keep activation chains in RAM or in memory-mapped files beside OUT")
    q.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="stream weights block by block from disk to disk (default: when the weights "
                        "exceed half the available RAM)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trust_remote_code(q)
    add_recipe_options(q)
    add_auto_budget(q)
    q.set_defaults(func=cmd_quantize)

    pp = sub.add_parser("preprocess", help="write the FP model after CBQ's coarse-to-fine preprocessing (CFP) "
                        "and/or QuaRot-style rotations (--rotate), for crossblock or other tools")
    pp.add_argument("--model", required=True, help="a local HF folder or a hub id")
    pp.add_argument("--calib", nargs="+", default=None, help="calibration text: files, folders of .txt files, or builtin (the built-in mixed set, the default)")
    pp.add_argument("--cfp", action=argparse.BooleanOptionalAction, default=True,
                    help="run CFP (default on; --no-cfp with --rotate writes the rotated model only)")
    pp.add_argument("--rotate", action="store_true", help="rotate the hidden spaces first (Hadamard, as the rotate stage)")
    pp.add_argument("--rotate-seed", type=int, default=0)
    pp.add_argument("--rotate-online", action=argparse.BooleanOptionalAction, default=True,
                    help="a run-time rotation before down_proj (read back by crossblock.load; plain transformers "
                         "reads it folded); --no-rotate-online: nothing at run time, a plain model for any tool")
    pp.add_argument("--out", required=True)
    pp.add_argument("--nsamples", type=int, default=128)
    pp.add_argument("--seqlen", type=int, default=512)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--cfp-alpha", type=float, default=Cfp.alpha)
    pp.add_argument("--cfp-weights", action=argparse.BooleanOptionalAction, default=Cfp.weights,
                    help="also truncate outlier weights (CBQ; default off: only scale channels, the function is kept)")
    pp.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help="layers whose weights are not truncated, as quantize --skip names them")
    pp.add_argument("--dtype", default="float32")
    pp.add_argument("--device", default=None)
    pp.add_argument("--overwrite", action="store_true")
    pp.add_argument("--quiet", action="store_true")
    add_trust_remote_code(pp)
    pp.set_defaults(func=cmd_preprocess)

    e = sub.add_parser("eval", help="perplexity of a model on a text file (GPTQ protocol), zero-shot task accuracy")
    e.add_argument("--model", required=True)
    e.add_argument("--ppl", nargs="+", default=None, help="text file(s)")
    e.add_argument("--reference", default=None,
                   help="the full-precision model the quantized one came from: adds mean KL(FP || quantized) per "
                        "token, top-1 agreement and the reference's perplexity on the --ppl text")
    e.add_argument("--json", action="store_true", help="print one JSON object (keys ppl, and with --reference "
                   "kl, top1, ppl_reference, tokens; tasks) instead of a table")
    e.add_argument("--tasks", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated lm-evaluation-harness tasks (pip install crossblock[eval]): tinystories_next "
                        "(shipped, offline), hellaswag, arc_easy, piqa, winogrande, ...")
    e.add_argument("--task-dir", action="append", default=None, help="a folder of lm-eval task YAML files (repeatable); "
                   "refused if it would run Python (!function) or replace a task by name, unless --trust-task-dir")
    e.add_argument("--trust-task-dir", action="store_true",
                   help="let --task-dir folders run their Python and replace lm-eval's or shipped tasks of the same name")
    e.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--task-batch-size", type=int, default=16)
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--dtype", default="float32", help="dtype to evaluate in (default float32: bf16 matmuls are slow on most CPUs)")
    e.add_argument("--device", default=None)
    e.add_argument("--quiet", action="store_true")
    add_trust_remote_code(e)
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plan", help="print the windows of a recipe and the work they cost")
    pl.add_argument("--model", required=True)
    add_trust_remote_code(pl)
    add_recipe_options(pl)
    add_auto_budget(pl)
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("compare", help="rank recipes by last-block output error, cheaply (a prefix of the model)")
    c.add_argument("--model", required=True, help="a local HF folder or a hub id")
    c.add_argument("--calib", nargs="+", default=None, help="calibration text: files, folders of .txt files, or builtin (the built-in mixed set, the default)")
    c.add_argument("--blocks", type=int, default=None, help="quantize only the first N blocks (default: all)")
    c.add_argument("--device", default=None)
    c.add_argument("--quiet", action="store_true")
    add_trust_remote_code(c)
    add_recipe_options(c)
    c.set_defaults(func=cmd_compare, recipe="rtn,block,la,mb,cbq")

    r = sub.add_parser("report", help="per-block error table (and plot) of a quantized folder")
    r.add_argument("out")
    r.add_argument("--no-plot", action="store_true")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="offline end-to-end run on SmolLM2-135M (pip install crossblock[demo])")
    d.add_argument("--recipe", default=None, help="default: the best recipe measured for the bits")
    d.add_argument("--wbits", type=int, default=3)
    d.add_argument("--group-size", type=int, default=64)
    d.add_argument("--iters", type=int, default=None)
    d.add_argument("--out", default=None, help="also save the quantized model here")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed import init_from_env
    rank_device = init_from_env()  # under torchrun: join the process group
    if rank_device and getattr(args, "device", None) is None:
        args.device = rank_device
    if getattr(args, "quiet", False):
        import transformers
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    try:
        args.func(args)
    except CrossblockError as e:
        print(f"crossblock: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossblock: interrupted; no output was written (a quantize run that finished a window "
              "continues with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
