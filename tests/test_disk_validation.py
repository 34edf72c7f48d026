"""Whatever crossblock reads from disk is validated: a corrupt or hostile crossblock.json,
config.json or checkpoint ends in exit code 2 and one line, never a traceback, an unbounded
allocation or a quietly wrong model (issue 13.3), also under a seeded fuzzer."""
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CALIB_FILE, EVAL_FILE, STORIES
from crossblock.cli import main
from crossblock.output import partial_dir

FAST = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--group-size", "-1", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A W4A8 static fake-quant folder and a compressed-tensors one (per channel, symmetric)."""
    base = tmp_path_factory.mktemp("folders")
    common = ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), *FAST]
    assert main([*common, "--out", str(base / "fake"), "--abits", "8", "--no-act-dynamic", "--iters", "2",
                 "--recipe", "block"]) == 0
    assert main([*common, "--out", str(base / "ct"), "--format", "compressed-tensors", "--sym"]) == 0
    return base


def evaluate(folder):
    return ["eval", "--model", str(folder), "--ppl", str(EVAL_FILE), "--seqlen", "64", "--max-windows", "2", "--quiet"]


def refused(capsys, args, pattern=""):
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossblock: error:") and pattern in err, err
    assert "perplexity" not in captured.out


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def first_layer(d):
    return next(iter(d["activations"]["layers"]))


HOSTILE_REPORTS = {
    "huge bits": (lambda d: d["activations"].update(bits=1e30), "bits must be an integer"),
    "bits as a string": (lambda d: d["activations"].update(bits="8"), "bits must be an integer"),
    "quantizer on the embedding": (lambda d: d["activations"]["layers"].update({"model.embed_tokens": [0.1, 3]}),
                                   "not a quantized linear layer"),
    "unknown layer": (lambda d: d["activations"]["layers"].update({"nope": [0.1, 3]}), "not a quantized"),
    "negative step": (lambda d: d["activations"]["layers"].update({first_layer(d): [-1, 3]}), "step > 0"),
    "nan step": (lambda d: d["activations"]["layers"].update({first_layer(d): [float("nan"), 3]}), "step > 0"),
    "zero point out of range": (lambda d: d["activations"]["layers"].update({first_layer(d): [0.1, 999]}), "zero point"),
    "layers not an object": (lambda d: d["activations"].update(layers=[1, 2]), "layers must be"),
}


@pytest.mark.slow  # a whole quantization in its fixture or body (>1.2 s)
@pytest.mark.parametrize("case", HOSTILE_REPORTS)
def test_hostile_crossblock_json_is_refused_at_eval(case, folders, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(folders / "fake", folder)
    fn, pattern = HOSTILE_REPORTS[case]
    edit_json(folder / "crossblock.json", fn)
    refused(capsys, evaluate(folder), pattern)


def test_malformed_json_files_are_one_line(folders, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(folders / "fake", folder)
    (folder / "crossblock.json").write_text('{"activations": ')
    refused(capsys, evaluate(folder), "not a readable JSON file")
    refused(capsys, ["report", str(folder)], "not a readable JSON file")
    (folder / "crossblock.json").write_text('{"blocks": "x"}')
    refused(capsys, ["report", str(folder), "--no-plot"], "blocks must be")
    (folder / "config.json").write_text("[1, 2")
    refused(capsys, evaluate(folder), "config.json: not a readable JSON file")


def repack(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def ct_bits(folder, bits):
    def fn(d):
        for group in d["quantization_config"]["config_groups"].values():
            group["weights"]["num_bits"] = bits
    edit_json(folder / "config.json", fn)


def scale_shape(tensors):
    key = next(k for k in tensors if k.endswith("weight_scale"))
    tensors[key] = tensors[key][:-1]


HOSTILE_CT = {
    "num_bits disagrees with the data": (lambda f: ct_bits(f, 2), "num_bits does not match the data"),
    "num_bits out of range": (lambda f: ct_bits(f, 1000), ""),
    "scales of the wrong shape": (lambda f: repack(f, scale_shape), "down_proj.weight_scale: shape (63, 1), expected "
                                                                    "(64, 1) for the layer's 64x172 weight"),
    "a missing tensor": (lambda f: repack(f, lambda t: t.pop(next(k for k in t if k.endswith("weight_scale")))),
                         "weight_scale: missing"),
}


@pytest.mark.parametrize("case", HOSTILE_CT)
def test_hostile_compressed_tensors_folder_is_refused(case, folders, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(folders / "ct", folder)
    fn, pattern = HOSTILE_CT[case]
    fn(folder)
    refused(capsys, evaluate(folder), pattern)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A gptq folder and an asymmetric compressed-tensors one, 8 and 4 bits, groups of 4."""
    base = tmp_path_factory.mktemp("packed")
    common = ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), *FAST[:-3], "--group-size", "4",
              "--quiet", "--recipe", "rtn"]
    assert main([*common, "--out", str(base / "gptq"), "--format", "gptq", "--wbits", "8", "--sym"]) == 0
    assert main([*common, "--out", str(base / "compressed-tensors"), "--format", "compressed-tensors", "--wbits", "4",
                 "--no-sym"]) == 0
    return base


def replace(suffix, fn):
    key = f"model.layers.0.mlp.down_proj.{suffix}"
    return lambda t: t.update({key: fn(t[key])}) if fn is not None else t.pop(key)


DOWN = "model.layers.0.mlp.down_proj"
GPTQ_SHAPES = " for 8-bit integers of the layer's 64x172 weight, group_size 4"
CT_SHAPES = " for the layer's 64x172 weight with 43 group(s) per row"
TAMPERED = {  # format, edit of the tensors, the line after "crossblock: error: "
    "gptq qweight short": ("gptq", replace("qweight", lambda t: t[:-1]),
                           f"gptq tensor {DOWN}.qweight: shape (42, 64), expected (43, 64){GPTQ_SHAPES}"),
    "gptq qzeros transposed": ("gptq", replace("qzeros", lambda t: t.t().contiguous()),
                               f"gptq tensor {DOWN}.qzeros: shape (16, 43), expected (43, 16){GPTQ_SHAPES}"),
    "gptq scales deleted": ("gptq", replace("scales", None), f"gptq tensor {DOWN}.scales: missing"),
    "gptq scales as integers": ("gptq", replace("scales", lambda t: t.to(torch.int32)),
                                f"gptq tensor {DOWN}.scales: stored as int32, not floating point"),
    "gptq g_idx short": ("gptq", replace("g_idx", lambda t: t[:-1]),
                         f"gptq tensor {DOWN}.g_idx: shape (171,), expected (172,){GPTQ_SHAPES}"),
    "gptq g_idx permuted": ("gptq", replace("g_idx", lambda t: t.flip(0).contiguous()),
                            f"gptq layer {DOWN} uses act-order (a permuted g_idx); crossblock reads desc_act false"),
    "ct weight_shape edited": ("compressed-tensors", replace("weight_shape", lambda t: torch.tensor([64, 170])),
                               f"compressed-tensors tensor {DOWN}.weight_shape: [64, 170], but the layer's weight is "
                               "64x172"),
    "ct weight_scale deleted": ("compressed-tensors", replace("weight_scale", None),
                                f"compressed-tensors tensor {DOWN}.weight_scale: missing"),
    "ct zero point deleted": ("compressed-tensors", replace("weight_zero_point", None),
                              f"compressed-tensors tensor {DOWN}.weight_zero_point: missing"),
    "ct zero point short": ("compressed-tensors", replace("weight_zero_point", lambda t: t[:-1]),
                            f"compressed-tensors tensor {DOWN}.weight_zero_point: shape (7, 43), expected (8, 43)"
                            f"{CT_SHAPES}"),
    "ct packed as floats": ("compressed-tensors", replace("weight_packed", lambda t: t.float()),
                            f"compressed-tensors tensor {DOWN}.weight_packed: stored as float32, not int32"),
}


@pytest.mark.slow  # a whole quantization in its fixture or body (>1.2 s)
@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_packed_folder_names_the_tensor(case, packed, tmp_path, capsys):
    """load/eval of a packed folder with one tensor edited says what is wrong with which tensor
    (not act-order, num_bits or a bare KeyError); only a genuinely permuted g_idx is act-order."""
    fmt, fn, line = TAMPERED[case]
    folder = tmp_path / "m"
    shutil.copytree(packed / fmt, folder)
    repack(folder, fn)
    refused(capsys, evaluate(folder), f"crossblock: error: {line}")


def interrupted_run(tmp_path, windows=2):
    """The staging folder of a cbq run stopped after `windows` windows."""
    import crossblock.api as api
    out = tmp_path / "out"
    real = api.write_checkpoint

    def stop(folder, state, *args):
        real(folder, state, *args)
        if state.next_window == windows:
            raise KeyboardInterrupt
    api.write_checkpoint = stop
    try:
        assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out),
                     "--recipe", "cbq", "--iters", "2", *FAST]) == 130
    finally:
        api.write_checkpoint = real
    return out


def tamper_metadata(path, **changes):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, **changes})


HOSTILE_CHECKPOINTS = {
    "next_window edited": (lambda p: tamper_metadata(p, next_window="4"), "does not match"),
    "next_window not a number": (lambda p: tamper_metadata(p, next_window="x"), "does not match"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "not a readable checkpoint"),
    "garbage": (lambda p: p.write_bytes(b"\xff" * 64), "not a readable checkpoint"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", HOSTILE_CHECKPOINTS)
def test_tampered_checkpoint_is_refused_at_resume(case, tmp_path, capsys):
    out = interrupted_run(tmp_path)
    capsys.readouterr()
    fn, pattern = HOSTILE_CHECKPOINTS[case]
    fn(partial_dir(out) / "checkpoint.safetensors")
    refused(capsys, ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out),
                     "--recipe", "cbq", "--iters", "2", "--resume", *FAST], pattern)
    assert not out.exists()


FUZZ = textwrap.dedent("""
    import random, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    import torch
    torch.set_num_threads(1)
    from crossblock.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def corrupt_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.choice(["flip", "truncate", "splice"])
    if kind == "truncate":
        return bytes(data[:rng.randrange(len(data))])
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] = rng.randrange(256) if kind == "flip" else rng.choice(b'{}[]",:0123456789e-')
    return bytes(data)


@pytest.mark.slow
def test_fuzzed_files_end_in_one_line_or_a_result(folders, tmp_path):
    """Seeded random corruptions of crossblock.json, config.json and a checkpoint: every run ends
    in rc 0 with a result or rc 2 with one line, under a 4 GB address-space limit."""
    rng = random.Random(13)
    out = interrupted_run(tmp_path)
    checkpoint = partial_dir(out) / "checkpoint.safetensors"
    pristine_checkpoint = checkpoint.read_bytes()
    resume = ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--recipe", "cbq",
              "--iters", "2", "--resume", *FAST]
    targets = [(folders / "fake" / "crossblock.json", "fake"), (folders / "fake" / "config.json", "fake"),
               (folders / "ct" / "config.json", "ct"), (checkpoint, None)]
    for trial in range(12):
        path, kind = targets[trial % len(targets)]
        if kind is None:
            data, args = pristine_checkpoint, resume
            work = path
        else:
            work = tmp_path / f"trial{trial}"
            shutil.copytree(folders / kind, work)
            data, args = path.read_bytes(), evaluate(work)
            work = work / path.name
        work.write_bytes(corrupt_bytes(data, rng))
        # CUDA cannot initialize under the 4 GB address-space limit (torch warns on stderr): CPU only
        proc = subprocess.run([sys.executable, "-c", FUZZ, *args], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        err = proc.stderr.strip()
        if proc.returncode == 2:
            assert len(err.splitlines()) == 1 and err.startswith("crossblock: error:"), (trial, err[-2000:])
        else:
            assert proc.returncode == 0, (trial, err[-2000:])
            assert "perplexity" in proc.stdout or "wrote" in proc.stdout
        if kind is None and out.exists():  # a resume that went through: start the next one afresh
            out = interrupted_run(tmp_path / f"again{trial}")
            checkpoint = partial_dir(out) / "checkpoint.safetensors"
            resume[resume.index("--out") + 1] = str(out)
            targets[3] = (checkpoint, None)
            pristine_checkpoint = checkpoint.read_bytes()


# -- model folders: seeded edits of a copy of stories260k, through quantize (both paths), eval, load --
MANY = textwrap.dedent("""
    import json, os, resource, sys, tempfile, traceback
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    import torch
    torch.set_num_threads(1)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import crossblock as cb
    from crossblock.cli import main
    from crossblock.errors import CrossblockError

    def load(path):
        try:
            model = cb.load(path)
        except CrossblockError as e:
            print(f"crossblock: error: {e}", file=sys.stderr)
            return 2
        print("weights", repr(sum(t.double().sum().item() for t in model.state_dict().values())))
        return 0

    results = []  # one process for every run (imports once), each run's stdout / stderr apart
    for argv in json.loads(sys.argv[1]):
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                rc = load(argv[1]) if argv[0] == "load" else main(argv)
            except BaseException:  # a traceback, MemoryError under the limit: recorded as rc 1
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
            out.seek(0)
            err.seek(0)
            results.append([rc, out.read().decode(), err.read().decode()])
    print(json.dumps(results))
""")


WEIGHT_EDITS = ["delete", "extra", "reshape", "retype"]
CONFIG_EDITS = ["num_hidden_layers", "hidden_size", "vocab_size", "model_type", "intermediate_size",
                "num_key_value_heads", "use_cache"]


def edit_weights(folder, rng, trial):
    from safetensors.torch import load_file as load, save_file as save
    tensors = load(folder / "model.safetensors")
    key = rng.choice(sorted(tensors))
    kind = WEIGHT_EDITS[trial % len(WEIGHT_EDITS)]
    if kind == "delete":
        del tensors[key]
    elif kind == "extra":
        key = f"model.layers.{rng.randrange(6)}.extra.weight"
        tensors[key] = torch.zeros(rng.randrange(1, 9), 64)
    elif kind == "reshape":
        t = tensors[key]
        tensors[key] = t.reshape(t.shape[::-1]).contiguous() if t.dim() == 2 and t.shape[0] != t.shape[1] \
            else t.reshape(-1)[:-1].contiguous()
    else:
        dtype = [torch.float64, torch.int32, torch.bool, torch.int8][trial // len(WEIGHT_EDITS) % 4]  # float64: harmless
        tensors[key] = tensors[key].to(dtype)
        kind = f"retype {dtype}"
    save(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return f"{kind} {key}"


def edit_config(folder, rng, trial):
    key = CONFIG_EDITS[trial % len(CONFIG_EDITS)]
    value = rng.choice({"num_hidden_layers": [4, 6], "hidden_size": [32, 128], "vocab_size": [256, 1024],
                        "model_type": ["gpt2", "bert", "x"], "intermediate_size": [171, 344],
                        "num_key_value_heads": [2, 8], "use_cache": [False]}[key])
    edit_json(folder / "config.json", lambda d: d.update({key: value}))
    return f"config {key}={value}"


@pytest.mark.slow
def test_fuzzed_model_folders_end_in_one_line_or_the_intact_result(tmp_path):
    """Seeded edits of a copy of stories260k (tensors deleted, added, reshaped, retyped; config.json
    edited): quantize (in memory and --low-memory), eval and load each end in rc 2 with one line,
    or rc 0 with what the intact model gives (a harmless edit: e.g. float64 weights, use_cache),
    under a 4 GB address-space limit."""
    rng = random.Random(26)
    folders = {"intact": tmp_path / "intact"}
    shutil.copytree(STORIES, folders["intact"])
    for trial in range(16):  # every kind of edit, on seeded tensors and values
        folder = tmp_path / f"trial{trial}"
        shutil.copytree(STORIES, folder)
        for f in folder.iterdir():
            f.chmod(0o644)
        folders[(edit_weights if trial % 2 else edit_config)(folder, rng, trial // 2)] = folder
    jobs, names = [], []
    for what, folder in folders.items():
        quantize = ["quantize", "--model", str(folder), "--calib", str(CALIB_FILE), "--recipe", "rtn", "--wbits", "4",
                    "--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--batch-size", "4", "--quiet"]
        for run, argv in {"in memory": [*quantize, "--out", str(folder) + ".mem", "--no-low-memory"],
                          "low memory": [*quantize, "--out", str(folder) + ".low", "--low-memory"],
                          "eval": evaluate(folder), "load": ["load", str(folder)]}.items():
            jobs.append(argv)
            names.append((what, run, argv))
    proc = subprocess.run([sys.executable, "-c", MANY, json.dumps(jobs)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    intact = {run: out for (what, run, _), (rc, out, err) in zip(names, results) if what == "intact"}
    for (what, run, argv), (rc, out, err) in zip(names, results):
        err = err.strip()
        if rc == 2:
            assert len(err.splitlines()) == 1 and err.startswith("crossblock: error:"), (what, run, err[-2000:])
            continue
        assert rc == 0, (what, run, err[-2000:])
        if run in ("eval", "load"):
            assert out == intact[run], (what, run, out)
        else:  # the weights written are the intact model's (config.json keeps a harmless edit)
            written = Path(argv[argv.index("--out") + 1])
            reference = Path(str(folders["intact"]) + written.suffix)
            assert (written / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes(), \
                (what, run)
