"""CUDA paths (skipped without a GPU): bf16 autocast windows, weights that stay on the CPU
between windows, GPU memory independent of depth, CPU/GPU agreement in quality."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import crossblock as cb
from crossblock.api import quantize_folder
from conftest import CALIB_FILE, STORIES, load_stories

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CALIB = dict(nsamples=16, seqlen=128, batch_size=4)


def test_window_engine_on_cuda_beats_rtn_and_leaves_weights_on_cpu(calib_text):
    model, tok = load_stories()
    _, report = cb.quantize(model, tok, cb.Recipe.preset("cbq", wbits=2, group_size=-1, iters=40, **CALIB),
                            calib=calib_text, device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    last = report["blocks"][-1]
    assert last["mse"] < last["rtn"]["mse"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def quantized_ppl(preset, device, calib_text, eval_text):
    model, tok = load_stories()
    cb.quantize(model, tok, cb.Recipe.preset(preset, wbits=3, group_size=-1, **CALIB), calib=calib_text,
                device=device, progress=False)
    return cb.evaluate(model, tok, eval_text, seqlen=256, progress=False)


def test_gptq_on_cuda_is_as_good_as_on_cpu(calib_text, eval_text):
    """On CUDA the block inputs come from bf16 autocast, so the Hessians (and many roundings)
    differ from the CPU's; the quality must not."""
    cpu, cuda = (quantized_ppl("gptq", d, calib_text, eval_text) for d in ("cpu", "cuda"))
    rtn = quantized_ppl("rtn", "cuda", calib_text, eval_text)
    assert cuda < min(1.03 * cpu, rtn), (cpu, cuda, rtn)


def peak_gpu_bytes(layers: int) -> int:
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    cb.quantize(model, None, cb.Recipe.preset("cbq", wbits=4, group_size=64, iters=2, nsamples=8, seqlen=64,
                                              batch_size=4), calib=torch.randint(0, 512, (8, 64)), device="cuda",
                progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    return torch.cuda.max_memory_allocated()


def test_gpu_memory_does_not_grow_with_depth():
    """Weights stay on the CPU and visit the GPU one window at a time: a model three times as
    deep needs the same GPU memory (one window of 2 blocks, its quantizer graph, one batch)."""
    shallow, deep = peak_gpu_bytes(4), peak_gpu_bytes(12)
    assert deep < 1.1 * shallow, (shallow, deep)


def test_finetune_on_cuda_lowers_held_out_kl_and_matches_the_cpu(calib_text, eval_text):
    """The finetune stage moves the model to the GPU and back: same integers as the windows left,
    held-out KL lowered, quality within 3% of the same recipe on the CPU."""
    ppl = {}
    for device in ("cpu", "cuda"):
        model, tok = load_stories()
        recipe = cb.Recipe.preset("best", wbits=3, group_size=32, iters=20, finetune_steps=20, **CALIB)
        _, report = cb.quantize(model, tok, recipe, calib=calib_text, device=device, progress=False)
        ft = report["finetune"]
        assert ft["held_out_loss_after"] < ft["held_out_loss_before"], (device, ft)
        assert all(p.device.type == "cpu" for p in model.parameters())
        ppl[device] = cb.evaluate(model, tok, eval_text, seqlen=256, progress=False)
    assert ppl["cuda"] < 1.03 * ppl["cpu"], ppl


def test_low_memory_on_cuda_writes_what_the_in_memory_path_writes(tmp_path):
    """--low-memory streams blocks from disk while the windows run on the GPU: the same files."""
    recipe = cb.Recipe.preset("block", wbits=3, group_size=32, iters=5, **CALIB)
    for path, low_memory in (("mem", False), ("stream", True)):
        quantize_folder(str(STORIES), [str(CALIB_FILE)], str(tmp_path / path), recipe, device="cuda",
                           progress=False, low_memory=low_memory)
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == \
        (tmp_path / "stream" / "model.safetensors").read_bytes()
