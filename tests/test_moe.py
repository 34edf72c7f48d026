"""Mixture-of-experts models (tiny, random, built from config classes): fused experts quantized as
E independent matrices through RTN, GPTQ and the window engine, an unfused ModuleList form,
shared experts, routers left in full precision and reported, and the exports."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig)

import crossblock as cb
from crossblock.errors import CrossblockError
from crossblock.quant.grid import group_view

BITS, GROUP = 3, 16
IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
SMALL = dict(wbits=BITS, group_size=GROUP, nsamples=8, seqlen=32, batch_size=4)
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


class UnfusedMoe(nn.Module):
    """The unfused form (older checkpoints, some families): a Linear router and a ModuleList of
    per-expert MLPs of Linear layers; top-1 routing over all but the last expert, so the last one
    never sees a token."""

    def __init__(self, hidden=64, inter=32, experts=4):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"up_proj": nn.Linear(hidden, inter, bias=False),
                                                    "down_proj": nn.Linear(inter, hidden, bias=False)})
                                     for _ in range(experts))

    def forward(self, x):
        logits = self.gate(x)[..., :-1]
        pick = logits.argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = pick == e
            if hit.any():
                y = expert["down_proj"](torch.relu(expert["up_proj"](x[hit]))) * logits[hit][:, e:e + 1].sigmoid()
                out[hit] = y.to(out.dtype)  # bf16 under autocast, as HF's MoE blocks cast it back
        return out


class LastExpertNeverRouted(nn.Module):
    """A fused model's router that never picks the last expert (for the no-token fallback)."""

    def __init__(self, router):
        super().__init__()
        self.router = router  # keeps the name ...mlp.gate.router.weight: still a router

    def forward(self, hidden):
        r = self.router
        logits = nn.functional.linear(hidden.reshape(-1, r.hidden_dim), r.weight)
        logits[:, -1] = float("-inf")
        weights, index = torch.topk(logits.softmax(-1), r.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), index


def build(family: str):
    torch.manual_seed(0)
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                             num_experts=4, num_experts_per_tok=2)
    elif family == "mixtral":
        cfg = MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen2_moe":  # a shared expert beside the routed ones
        cfg = Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                             num_experts=4, num_experts_per_tok=2)
    else:
        cfg = LlamaConfig(**COMMON, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if family == "unfused":
        for layer in model.model.layers:
            layer.mlp = UnfusedMoe()
    return model


@functools.lru_cache(maxsize=None)
def run(family: str, preset: str, **overrides):
    model = build(family)
    model, report = cb.quantize(model, None, cb.Recipe.preset(preset, **SMALL, **overrides), calib=IDS,
                                progress=False, device="cpu")
    return model, report


def expert_matrices(model) -> dict[str, torch.Tensor]:
    """Every expert weight of the model as (rows, in): a fused parameter's (E * out, in) view, or an
    unfused expert's Linear weight."""
    out = {}
    for name, p in model.named_parameters():
        if ".experts." in f"{name}." and "shared" not in name and p.dim() >= 2:
            out[name] = p.detach().reshape(-1, p.shape[-1])
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "unfused"])
def test_every_expert_weight_is_on_a_grid_and_the_router_stays_fp(family):
    fp = build(family)
    model, report = run(family, "gptq")
    matrices = expert_matrices(model)
    assert matrices
    for name, w in matrices.items():
        distinct = max(len(torch.unique(g)) for g in group_view(w, GROUP).reshape(-1, GROUP))
        assert distinct <= 2 ** BITS, name
        assert not torch.equal(w, dict(fp.named_parameters())[name].detach().reshape(w.shape)), name
    left = {w["name"]: w["why"] for w in report["unquantized"]}
    routers = [n for n, why in left.items() if why == "router"]
    assert routers and all("gate" in n.split(".")[-2] for n in routers)
    for name, p in model.named_parameters():  # routers are untouched, every expert is quantized
        if name in routers:
            assert torch.equal(p, dict(fp.named_parameters())[name])
        assert name not in matrices or name not in left
    if family == "qwen2_moe":  # the shared expert is quantized like any MLP; its sigmoid gate is a router
        assert "model.layers.0.mlp.shared_expert_gate.weight" in routers
        assert "model.layers.0.mlp.shared_expert.down_proj.weight" not in left


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_gptq_imatrix_and_block_beat_rtn_on_the_block_output(family):
    for preset, extra in [("gptq", {}), ("rtn", dict(init="imatrix")), ("block", dict(iters=20))]:
        _, report = run(family, preset, **extra)
        for block in report["blocks"]:
            assert block["rel_mse"] < block["rtn"]["rel_mse"], (preset, block)


def test_expert_weights_train_in_the_window_engine():
    """Gradients reach the rounding offsets and clipping of fused experts, and training moves them."""
    from crossblock.engine.reconstruct import WindowEngine, layer_mode
    from crossblock.model.adapter import capture, find_blocks
    from crossblock.quant.experts import QuantExperts
    model = build("qwen3_moe")
    recipe = cb.Recipe.preset("block", **SMALL, iters=20).validated()
    x0, calls = capture(model, IDS, batch_size=4)
    _, blocks = find_blocks(model)
    engine = WindowEngine(blocks, calls, recipe.windows, recipe.grid, recipe.activations, recipe.data, progress=False)
    engine.wrap(0, lambda: x0, torch.Generator().manual_seed(0))
    experts = blocks[0].mlp.experts
    assert isinstance(experts, QuantExperts)
    weight = experts.weights["gate_up_proj"]
    with torch.no_grad():
        target = engine.run(0, 0, x0) + 0.01
    (engine.run(0, 0, x0) - target).pow(2).mean().backward()
    assert weight.offset.grad.abs().sum() > 0 and weight.max_mult.grad.abs().sum() > 0
    assert experts.weights["down_proj"].offset.grad.abs().sum() > 0
    start = weight.offset.detach().clone()
    with layer_mode([blocks[0]], "fp"):
        target = engine.run_all(0, 0, x0)
    info = engine.train(engine.schedule[0], x0, target, torch.Generator().manual_seed(0))
    assert info["loss_after"] < info["loss_before"] and not torch.equal(weight.offset, start)


@pytest.mark.parametrize("all_experts", [False, True])
def test_expert_without_routed_tokens_gets_rtn_and_a_report_entry(all_experts):
    model = build("qwen3_moe")
    for layer in model.model.layers:
        layer.mlp.gate = LastExpertNeverRouted(layer.mlp.gate)
    recipe = cb.Recipe.preset("gptq", **SMALL)
    recipe.windows.all_experts = all_experts
    _, report = cb.quantize(model, None, recipe, calib=IDS, progress=False, device="cpu")
    fallback = report.get("rtn_fallback", [])
    if all_experts:  # every token went through every expert for the statistics
        assert fallback == []
    else:
        assert {(f["block"], f["layer"], f["expert"]) for f in fallback} == {
            (j, f"mlp.experts.weights.{p}", 3) for j in (0, 1) for p in ("gate_up_proj", "down_proj")}
        w = model.model.layers[0].mlp.experts.gate_up_proj.detach()
        rtn = cb.Recipe.preset("rtn", **SMALL).grid.rtn(build("qwen3_moe").model.layers[0].mlp.experts.gate_up_proj[3])
        assert torch.equal(w[3], rtn.to(w.dtype))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_unfused_expert_without_tokens_gets_rtn_not_zeros():
    model, report = run("unfused", "gptq")
    fallback = {(f["block"], f["layer"]) for f in report["rtn_fallback"]}
    assert fallback == {(j, f"mlp.experts.3.{p}") for j in (0, 1) for p in ("up_proj", "down_proj")}
    w = model.model.layers[0].mlp.experts[3]["up_proj"].weight
    assert torch.isfinite(w).all() and w.abs().sum() > 0


def test_unquantized_weights_printed_once_and_written(tmp_path, capfd):
    model, report = run("qwen3_moe", "rtn")
    capfd.readouterr()
    cb.save(model, None, tmp_path / "out", report=report)
    lines = [l for l in capfd.readouterr().err.splitlines() if "left in full precision" in l]
    assert len(lines) == 1 and "router 2" in lines[0] and "crossblock.json" in lines[0]
    written = json.loads((tmp_path / "out" / "crossblock.json").read_text())["unquantized"]
    assert {"name": "model.layers.0.mlp.gate.weight", "shape": [4, 64], "why": "router"} in written


def test_compressed_tensors_reloads_in_plain_transformers_with_the_fake_quant_logits(tmp_path):
    model = build("qwen3_moe")
    model, report = cb.quantize(model, None, cb.Recipe.preset("gptq", **dict(SMALL, wbits=4), sym=True), calib=IDS,
                                progress=False, device="cpu", format="compressed-tensors")
    cb.save(model, None, tmp_path / "ct", format="compressed-tensors", report=report)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.gate" in config["ignore"]
    with torch.no_grad():
        ref = model(IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()(IDS).logits
        ours = cb.load(tmp_path / "ct")(IDS).logits
    assert torch.equal(plain, ref) and torch.equal(ours, ref)


@pytest.mark.parametrize("fmt, sym, message", [
    ("gptq", True, "gptq export cannot store fused MoE experts"),
    ("compressed-tensors", False, "needs sym: true"),
])
def test_formats_that_cannot_hold_fused_experts_refuse_before_work(fmt, sym, message):
    with pytest.raises(CrossblockError, match=message):
        cb.quantize(build("mixtral"), None, cb.Recipe.preset("rtn", **dict(SMALL, wbits=4), sym=sym), calib=IDS,
                    progress=False, device="cpu", format=fmt)


def test_activation_quantization_of_fused_experts_is_refused():
    with pytest.raises(CrossblockError, match="activation quantization is not supported for fused MoE experts"):
        cb.quantize(build("qwen3_moe"), None, cb.Recipe.preset("rtn", **SMALL, abits=8), calib=IDS,
                    progress=False, device="cpu")
