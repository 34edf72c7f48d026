"""The low-memory path (stream.py) writes the same files as the in-memory path, byte for byte,
and a low-memory run killed mid-way resumes to those same bytes. (Its peak memory is measured by
bench/low_memory.py, not here.)"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import CALIB_FILE, STORIES, kill_when
from crossblock import spill, stream
from crossblock.cli import main
from crossblock.engine.checkpoint import CHECKPOINT_FILE
from crossblock.output import partial_dir

SMALL = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--quiet"]
VOLATILE = {"wall_seconds", "stage_seconds", "peak_rss_mib", "peak_cuda_mib", "low_memory", "resumed_at_window",
            "save_check", "quality"}  # the in-memory path compares the saved logits and FP's, the low-memory path cannot


def hashes(folder) -> dict[str, str]:
    """sha256 of every file of an output folder; crossblock.json without its timings, and not the
    model card (README.md: written from crossblock.json, timings and the save check included)."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.name == "README.md":
            continue
        if f.name == "crossblock.json":
            info = {k: v for k, v in json.loads(f.read_text()).items() if k not in VOLATILE}
            for w in info.get("windows", []):
                w.pop("seconds", None)
            data = json.dumps(info, sort_keys=True).encode()
        else:
            data = f.read_bytes()
        out[f.name] = hashlib.sha256(data).hexdigest()
    return out


def both_paths(tmp_path, model, *args) -> tuple[dict, dict]:
    common = ["quantize", "--model", str(model), "--calib", str(CALIB_FILE), *SMALL, *args]
    assert main([*common, "--out", str(tmp_path / "memory"), "--no-low-memory"]) == 0
    assert main([*common, "--out", str(tmp_path / "stream"), "--low-memory"]) == 0
    report = json.loads((tmp_path / "stream" / "crossblock.json").read_text())
    assert report["low_memory"] is True and not (tmp_path / "stream" / stream.SPILL_DIR).exists()
    return hashes(tmp_path / "memory"), hashes(tmp_path / "stream")


@pytest.fixture(scope="module")
def llama12(tmp_path_factory):
    """A randomly initialized 12-block Llama in bfloat16, its weights in 3 shards, with the
    stories260k tokenizer: nothing downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("llama12")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="200KB")
    for f in STORIES.glob("tokenizer*"):
        shutil.copy(f, folder)
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


# (format, recipe flags): a trained window with look-ahead, static activation steps, the packed formats
STORIES_CASES = {
    "fake-la": ["--recipe", "la", "--iters", "4", "--wbits", "3", "--group-size", "32", "--skip", "down_proj"],
    "fake-block-static-a8": ["--recipe", "block", "--iters", "4", "--wbits", "4", "--group-size", "32",
                             "--abits", "8", "--no-act-dynamic"],
    "compressed-tensors-a8": ["--recipe", "rtn", "--format", "compressed-tensors", "--wbits", "4",
                              "--group-size", "-1", "--abits", "8"],
    # weight-only: pack-quantized, with packed zero points (the same Format.tensors as in memory)
    "compressed-tensors-w2-g4-asym": ["--recipe", "rtn", "--format", "compressed-tensors", "--wbits", "2",
                                      "--group-size", "4"],
    "gptq": ["--recipe", "gptq", "--format", "gptq", "--wbits", "8", "--group-size", "-1", "--sym"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", STORIES_CASES)
def test_stories_same_files_both_paths(tmp_path, case):
    memory, streamed = both_paths(tmp_path, STORIES, *STORIES_CASES[case])
    assert "model.safetensors" in memory
    assert streamed == memory


@pytest.mark.slow
def test_mixed_precision_compressed_tensors_same_files_both_paths(tmp_path, monkeypatch):
    """A grid that gives layers different settings (here: down_proj 8-bit, the rest 4-bit) is
    written by the low-memory path as in memory: compressed-tensors' mixed-precision config, one
    group per setting targeted by name (the same Format.tensors and write_config on both paths)."""
    import dataclasses
    from crossblock.grids.uniform import UniformGrid
    one_grid = UniformGrid.for_layer
    monkeypatch.setattr(UniformGrid, "for_layer", lambda self, name, *rest: dataclasses.replace(self, bits=8)
                        if name.endswith("down_proj") else one_grid(self, name, *rest))
    memory, streamed = both_paths(tmp_path, STORIES, "--recipe", "rtn", "--format", "compressed-tensors",
                                  "--wbits", "4", "--group-size", "4", "--sym")
    assert streamed == memory
    config = json.loads((tmp_path / "stream" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == []
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in config["config_groups"].values()}
    assert sorted(by_bits) == [4, 8] and all(t.endswith("down_proj") for t in by_bits[8])


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--recipe", "mb", "--iters", "3", "--wbits", "4", "--group-size", "32", "--format", "gptq", "--sym"],
    ["--recipe", "gptq", "--wbits", "3", "--group-size", "32", "--save-dtype", "float32"],
], ids=["mb-gptq-format", "gptq-fake-float32"])
def test_random_12_block_llama_same_files_both_paths(tmp_path, llama12, args):
    memory, streamed = both_paths(tmp_path, llama12, *args, "--dtype", "auto")
    assert streamed == memory


# -- mixture-of-experts checkpoints: per-expert matrices on disk, fused 3-D experts in the model ---
def moe_folder(tmp_path, family):
    """A tiny random MoE model (tests/test_moe.py's build, with the stories tokenizer's vocabulary)
    saved by save_pretrained, which writes the experts unfused (Mixtral: block_sparse_moe.experts.E.w1/w2/w3)."""
    import test_moe
    folder = tmp_path / family
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(test_moe.COMMON, "vocab_size", 512)
        test_moe.build(family).to(torch.bfloat16).save_pretrained(folder)
    for f in STORIES.glob("tokenizer*"):
        shutil.copy(f, folder)
    return folder


MOE_CASES = {
    "mixtral-fake": ("mixtral", ["--recipe", "gptq", "--wbits", "3", "--group-size", "16"]),
    "qwen3_moe-fake": ("qwen3_moe", ["--recipe", "block", "--iters", "3", "--wbits", "4", "--group-size", "16"]),
    "mixtral-compressed-tensors": ("mixtral", ["--recipe", "rtn", "--format", "compressed-tensors", "--wbits", "4",
                                               "--group-size", "16", "--sym"]),
    "qwen2_moe-compressed-tensors": ("qwen2_moe", ["--recipe", "gptq", "--format", "compressed-tensors", "--wbits",
                                                   "4", "--group-size", "16", "--sym"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_checkpoint_same_files_both_paths(tmp_path, case):
    """Fused experts are read through transformers' conversion mapping, one block at a time, and
    written back per expert as save_pretrained writes them: the same bytes as in memory."""
    family, args = MOE_CASES[case]
    folder = moe_folder(tmp_path, family)
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert not any(k.endswith("gate_up_proj") for k in f.keys())  # the checkpoint holds per-expert matrices
    memory, streamed = both_paths(tmp_path, folder, *args, "--dtype", "auto")
    assert streamed == memory
    with safe_open(str(tmp_path / "stream" / "model.safetensors"), framework="pt") as f:
        assert any(".experts.3." in k for k in f.keys())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fake", "compressed-tensors"])
def test_moe_sharded_output_same_files_both_paths(tmp_path, monkeypatch, fmt):
    """Small shards: save_pretrained counts a storage shared by views once (the per-expert views
    of a fused parameter), so the spill files keep that sharing, and shard for shard the files
    are the same."""
    from transformers import PreTrainedModel
    save = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda self, *a, **k: save(self, *a, **{**k, "max_shard_size": "40KB"}))
    folder = moe_folder(tmp_path, "qwen3_moe")
    memory, streamed = both_paths(tmp_path, folder, "--recipe", "rtn", "--format", fmt, "--wbits", "4",
                                  "--group-size", "16", "--sym", "--dtype", "auto")
    assert "model.safetensors.index.json" in memory and len(memory) > 8
    assert streamed == memory


@pytest.mark.slow
def test_distinct_head_under_a_tied_config_is_written_as_in_memory(tmp_path, capsys):
    """config.json says tied, but the files hold an lm_head.weight of its own: transformers keeps
    the two apart, and so does the low-memory path (it wrote the embeddings only; issue 26.4)."""
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "head"
    shutil.copytree(STORIES, folder)
    tensors = load_file(folder / "model.safetensors")
    torch.manual_seed(0)
    head = tensors["model.embed_tokens.weight"] + 0.01 * torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file({**tensors, "lm_head.weight": head}, folder / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    memory, streamed = both_paths(tmp_path, folder, "--recipe", "rtn", "--wbits", "4", "--group-size", "32")
    assert streamed == memory
    assert load_file(tmp_path / "stream" / "model.safetensors")["lm_head.weight"].equal(head)
    assert "kept apart" in capsys.readouterr().err


def test_checkpoint_without_a_model_weight_is_refused_before_work(tmp_path, capsys):
    """A weight found neither under its name nor through transformers' conversion mapping (here
    the experts of a layer missing) is refused as missing, as the in-memory path refuses it, before
    any work: not as something to retry without --low-memory (issue 26.1)."""
    from safetensors.torch import load_file, save_file
    folder = moe_folder(tmp_path, "qwen3_moe")
    tensors = load_file(folder / "model.safetensors")
    for k in [k for k in tensors if k.startswith("model.layers.1.mlp.experts.")]:
        del tensors[k]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    capsys.readouterr()  # moe_folder's progress bars
    assert main(["quantize", "--model", str(folder), "--calib", str(CALIB_FILE), "--out", str(out), "--low-memory",
                 "--recipe", "rtn", "--wbits", "4", "--group-size", "16", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weight model.layers.1.mlp.experts.down_proj (and 1 more) is missing" in err
    assert "without --low-memory" not in err and not out.exists()
    assert main(["quantize", "--model", str(folder), "--calib", str(CALIB_FILE), "--out", str(out), "--no-low-memory",
                 "--recipe", "rtn", "--wbits", "4", "--group-size", "16", *SMALL]) == 2
    assert capsys.readouterr().err.strip() == err  # the same line as the in-memory load


def test_streaming_safetensors_writer_matches_safetensors(tmp_path):
    """write_safetensors (bytes copied file to file) == safetensors' save_file, any dtype mix."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5).to(torch.bfloat16), "a": torch.randn(7), "z": torch.arange(9).to(torch.uint8),
               "c": torch.arange(4, dtype=torch.int32).view(2, 2), "h": torch.randn(1, dtype=torch.float16),
               "scalar": torch.tensor(2.5), "q": torch.arange(6, dtype=torch.int64)}
    save_file(tensors, tmp_path / "spill.safetensors", metadata={"crossblock": json.dumps({"plain": [], "packed": {}})})
    files = spill.Mapped()
    mapped, _ = spill.open_spill(tmp_path / "spill.safetensors", files)
    spill.write_safetensors(mapped, tmp_path / "ours.safetensors", files, {"format": "pt"})
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    # from memory (the spill files): the same bytes, without save_file's copy of every tensor
    spill.write_safetensors(tensors, tmp_path / "from_memory.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "from_memory.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_whole_model_stages_and_formats_are_refused_before_work(tmp_path, capsys):
    base = ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(tmp_path / "o"),
            "--low-memory", *SMALL]
    assert main([*base, "--recipe", "rtn", "--rotate", "--wbits", "4", "--group-size", "32"]) == 2
    assert "--low-memory cannot run the rotate stage" in capsys.readouterr().err
    assert main([*base, "--recipe", "rtn", "--gguf-type", "Q8_0"]) == 2
    assert "--low-memory quantizes on the uniform grid only, not gguf" in capsys.readouterr().err
    assert main([*base, "--recipe", "auto", "--wbits", "3"]) == 2
    assert "--low-memory cannot run --recipe auto" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_default_recipe_streams_without_its_finetune_and_says_so(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--low-memory",
                 "--wbits", "3", "--group-size", "32", "--iters", "2", *SMALL]) == 0
    assert "the default recipe runs without its finetune here (--low-memory" in capsys.readouterr().err
    info = json.loads((out / "crossblock.json").read_text())
    assert [next(iter(s)) for s in info["recipe"]["stages"]] == ["windows"] and info["recipe"]["name"] == "best"
    assert info["recipe_chosen_by"]["finetune_dropped"].startswith("--low-memory") and "finetune" not in info


def test_automatic_choice_says_so(monkeypatch, capsys):
    size = stream.weights_bytes(STORIES)
    monkeypatch.setattr(stream, "available_ram", lambda: 10 * size)
    assert stream.choose(STORIES, None) is False
    monkeypatch.setattr(stream, "available_ram", lambda: size)
    assert stream.choose(STORIES, None) is True
    assert "streaming them block by block" in capsys.readouterr().err
    assert stream.choose(STORIES, False) is False  # --no-low-memory wins


# -- killed mid-way, resumed ----------------------------------------------------------------------
RESUME = ["--recipe", "cbq", "--wbits", "2", "--group-size", "-1", "--iters", "60", *SMALL]


def cli(out, *extra):
    cmd = [sys.executable, "-m", "crossblock", "quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE),
           "--out", str(out), *RESUME, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def windows_done(out) -> int:
    from safetensors import safe_open
    try:
        with safe_open(str(partial_dir(out) / CHECKPOINT_FILE), framework="pt") as f:
            return int(f.metadata()["next_window"])
    except Exception:
        return 0


@pytest.mark.slow
def test_low_memory_run_killed_midway_resumes_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    assert cli(ref, "--no-low-memory").wait() == 0
    out = tmp_path / "out"
    kill_when(cli(out, "--low-memory"), lambda: windows_done(out) >= 3)
    assert not out.exists()
    # the frozen blocks went to disk as they finished
    assert {"block0.safetensors", "block1.safetensors"} <= {p.name for p in (partial_dir(out) / stream.SPILL_DIR).iterdir()}
    resumed = cli(out, "--low-memory", "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert json.loads((out / "crossblock.json").read_text())["resumed_at_window"] == 3
    assert hashes(out) == hashes(ref)


@pytest.mark.slow
def test_two_ranks_low_memory_same_files_as_one_process(tmp_path):
    """torchrun: every rank reads its own blocks, rank 0 writes; RTN gives the same bits for any
    number of ranks, so the files equal a single in-memory process's."""
    args = ["--recipe", "rtn", "--wbits", "3", "--group-size", "32", "--device", "cpu", *SMALL]
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(tmp_path / "one"),
                 "--no-low-memory", *args]) == 0
    torchrun = shutil.which("torchrun", path=str(os.path.dirname(sys.executable)))
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "crossblock", "quantize", "--model",
                        str(STORIES), "--calib", str(CALIB_FILE), "--out", str(tmp_path / "two"), "--low-memory",
                        *args], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = hashes(tmp_path / "one"), hashes(tmp_path / "two")
    assert two.pop("crossblock.json") != one.pop("crossblock.json")  # ranks: 2
    assert two == one


# -- inputs checked as they are read (issue 26) ----------------------------------------------------
def stories_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(STORIES, folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def quantize_low_memory(folder, out, *args):
    return main(["quantize", "--model", str(folder), "--calib", str(CALIB_FILE), "--out", str(out), "--low-memory",
                 "--recipe", "rtn", "--wbits", "4", "--group-size", "32", *SMALL, *args])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossblock: error: ") and "Traceback" not in err, err
    return err.removeprefix("crossblock: error: ")


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_shard_changed_during_the_run_is_refused(tmp_path, monkeypatch, capsys, how):
    """The shard is replaced (a new file renamed over it) or rewritten in place after block 0 was
    read: block 1 would come from another checkpoint, so the run stops naming the file, and no
    output is written."""
    from safetensors.torch import load_file, save_file
    folder = stories_copy(tmp_path)
    shard = folder / "model.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.weight"] *= 2
    real = stream.BlockStream.load

    def load(self, j):
        if j == 1:
            if how == "replaced":
                save_file(tensors, tmp_path / "new.safetensors", metadata={"format": "pt"})
                os.replace(tmp_path / "new.safetensors", shard)
            else:
                save_file(tensors, shard, metadata={"format": "pt"})
        real(self, j)
    monkeypatch.setattr(stream.BlockStream, "load", load)
    out = tmp_path / "out"
    assert quantize_low_memory(folder, out) == 2
    assert one_line(capsys).startswith(f"{shard}: replaced or modified while this run was reading it")
    assert not out.exists()


def edit_tensors(folder, fn):
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def retype(key, dtype):
    return lambda t: t.update({key: (t[key] * 100).to(dtype)})


UP = "model.layers.1.mlp.up_proj.weight"
BAD_WEIGHTS = {  # (edit, what the line says after the file's name)
    "int32 linear": (retype(UP, torch.int32), f"weight {UP} is stored as int32, but it is a floating-point weight"),
    "int8 norm": (retype("model.layers.2.input_layernorm.weight", torch.int8),
                  "weight model.layers.2.input_layernorm.weight is stored as int8"),
    "bool embedding": (retype("model.embed_tokens.weight", torch.bool), "weight model.embed_tokens.weight is stored as bool"),
    "transposed": (lambda t: t.update({UP: t[UP].reshape(64, 172)}), f"weight {UP} has shape (64, 172) in the checkpoint"),
}


@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_bad_weight_refused_on_both_paths_before_work(tmp_path, capsys, case):
    """A weight of the wrong shape or stored as integers (transformers casts them to floats
    silently) is refused on both paths in one line, before any work: no staging folder is left to
    block the next run (issue 26)."""
    folder = stories_copy(tmp_path)
    edit, says = BAD_WEIGHTS[case]
    edit_tensors(folder, edit)
    out = tmp_path / "out"
    for path in ["--low-memory", "--no-low-memory"]:
        assert quantize_low_memory(folder, out, path) == 2
        line = one_line(capsys)
        assert says in line and line.startswith(str(folder)), line
        assert not out.exists() and not partial_dir(out).exists()
    if case == "int32 linear":  # the input put right, the next run needs no --overwrite
        shutil.copy(STORIES / "model.safetensors", folder / "model.safetensors")
        assert quantize_low_memory(folder, out) == 0


def test_expert_of_another_shape_refused_as_a_mismatch(tmp_path, capsys):
    """One expert's matrix of another shape than the layer's others: a mismatched weight, not a
    conversion to retry without --low-memory."""
    folder = moe_folder(tmp_path, "qwen3_moe")
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    edit_tensors(folder, lambda t: t.update({key: t[key][:-1]}))
    capsys.readouterr()
    assert quantize_low_memory(folder, tmp_path / "out", "--dtype", "auto", "--group-size", "16") == 2
    assert one_line(capsys) == (f"{folder}: weight {key} has shape (63, 32) in the checkpoint, the model (64, 32); "
                                "the files and config.json do not match")


def shard_names(folder):
    return sorted(f.name for f in folder.glob("model-*.safetensors"))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-1000])


def stretch_last_offsets(path):
    """The header's last tensor claims 4096 more bytes than the file holds."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def misplace_in_index(folder):
    """A key of the second shard put in the first (the second still holds others)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first, second = shard_names(folder)[:2]
    key = next(k for k, f in index["weight_map"].items() if f == second)
    index["weight_map"][key] = first
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


BAD_SHARDS = {  # (edit of the last shard / the folder, what the line says after the shard's path; None: runs)
    "truncated": (truncate, "not a readable safetensors file (Error while deserializing header: incomplete metadata"),
    "header offsets past the end": (stretch_last_offsets, "not a readable safetensors file (Error while deserializing "
                                                          "header: invalid shape, data type, or offset"),
    "missing": (lambda p: p.unlink(), "not a readable safetensors file ([Errno 2] No such file or directory"),
    "misplaced in the index": (lambda p: misplace_in_index(p.parent), None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_SHARDS)
def test_unreadable_shard_is_named_before_work(tmp_path, llama12, case):
    """A truncated, missing or inconsistent shard is an input problem named with its file, found
    before any work on both paths (not 'cannot write output folder' mid-run); a key the index puts
    in the wrong file is read from the file that holds it, as from_pretrained reads it."""
    folder = tmp_path / "model"
    shutil.copytree(llama12, folder)
    shard = folder / shard_names(folder)[-1]
    edit, says = BAD_SHARDS[case]
    edit(shard)
    args = ["quantize", "--model", str(folder), "--calib", str(CALIB_FILE), *SMALL, "--recipe", "rtn", "--wbits",
            "4", "--group-size", "32", "--dtype", "auto"]
    for path in ["--low-memory", "--no-low-memory"]:
        out = tmp_path / path.strip("-")
        r = subprocess.run([sys.executable, "-m", "crossblock", *args, "--out", str(out), path], capture_output=True,
                           text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        err = r.stderr.strip()
        if says is None:
            assert r.returncode == 0, err[-2000:]
            continue
        assert r.returncode == 2 and err.splitlines() == [err] and err.startswith(f"crossblock: error: {shard}: {says}"), err
        assert not out.exists() and not partial_dir(out).exists()
    if says is None:
        assert hashes(tmp_path / "low-memory") == hashes(tmp_path / "no-low-memory")


def stopped_run(out, path, windows=2):
    """A cbq run on `path` (--low-memory / --no-low-memory) interrupted after `windows` windows."""
    import crossblock.api as api
    real = api.write_checkpoint

    def stop(folder, state, *args):
        real(folder, state, *args)
        if state.next_window == windows:
            raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "write_checkpoint", stop)
        assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), path,
                     "--recipe", "cbq", "--iters", "2", "--group-size", "32", *SMALL]) == 130


@pytest.mark.slow
def test_resume_continues_on_the_path_the_run_started_on(tmp_path, capsys):
    """A killed --low-memory run keeps its finished blocks in the spill folder: resumed with
    --no-low-memory it is refused with the flag to use (it left stream/ inside the output); with no
    flag it continues streaming, and the output is the in-memory run's, without the spill folder.
    The same for an in-memory run resumed with --low-memory."""
    args = ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--recipe", "cbq", "--iters", "2",
            "--group-size", "32", *SMALL]
    assert main([*args, "--out", str(tmp_path / "ref"), "--no-low-memory"]) == 0
    for started, other in [("--low-memory", "--no-low-memory"), ("--no-low-memory", "--low-memory")]:
        out = tmp_path / started.strip("-")
        stopped_run(out, started)
        capsys.readouterr()
        assert main([*args, "--out", str(out), "--resume", other]) == 2
        assert one_line(capsys) == (
            f"{partial_dir(out)} holds a run started {'with' if started == '--low-memory' else 'without'} --low-memory, "
            f"whose finished blocks are kept {'in its spill folder' if started == '--low-memory' else 'in its checkpoint'}"
            f": resume it with {started} (or leave the flag out), or start over with --overwrite")
        assert not out.exists() and partial_dir(out).exists()
        assert main([*args, "--out", str(out), "--resume"]) == 0
        report = json.loads((out / "crossblock.json").read_text())
        assert report["resumed_at_window"] == 2 and report.get("low_memory", False) is (started == "--low-memory")
        assert not (out / stream.SPILL_DIR).exists() and hashes(out) == hashes(tmp_path / "ref")


def test_a_new_stage_that_needs_the_whole_model_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """#28: the capability is the stage's own declaration, checked in one place (not a list of names)."""
    from dataclasses import dataclass
    from crossblock.stages import STAGES, Stage

    @dataclass
    class Toy(Stage):
        needs_whole_model = True

        def run(self, model, job):
            job.report["toy"] = "ran"

    monkeypatch.setitem(STAGES.classes, "toy", Toy)
    Toy.kind_name, Toy.label = "toy", "toy stage"
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("name: toy\ndata: {nsamples: 8, seqlen: 64, batch_size: 4}\n"
                      "grid: {type: uniform, bits: 4, group_size: 32}\nstages:\n  - toy: {}\n  - windows: {}\n")
    # settings in the file: a stage the flat spelling does not know takes no flags (#28's one spelling)
    base = ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--recipe", str(recipe), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "low"), "--low-memory"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--low-memory cannot run the toy stage: it needs the whole model in memory (run without "
                        "--low-memory, or drop toy from the recipe)") and not (tmp_path / "low").exists()
    assert main([*base, "--out", str(tmp_path / "mem"), "--no-low-memory"]) == 0
    assert json.loads((tmp_path / "mem" / "crossblock.json").read_text())["toy"] == "ran"
