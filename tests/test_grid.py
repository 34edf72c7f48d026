import pytest
import torch

from crossblock.quant.grid import (CLIP_RATIOS, dequantize, fake_quantize, fake_quantize_weight, group_view,
                                  minmax_grid, num_groups, quantize_to_int, search_clip)
from crossblock.errors import CrossblockError
from crossblock.grids import GgufGrid, Mxfp4Grid, Nvfp4Grid, UniformGrid
from crossblock.quant.linear import QuantLinear
from crossblock.roundings import LoraRound, Nearest, SignRound


def rand_weight(out=12, cin=40, seed=0):
    return torch.randn(out, cin, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 8, 16])  # 16 leaves a ragged last group of 8 columns
@pytest.mark.parametrize("sym", [False, True])
def test_fake_quant_lies_on_grid_and_is_idempotent(bits, group_size, sym):
    w = rand_weight()
    scale, zero = minmax_grid(w, bits, group_size, sym)
    q = quantize_to_int(w, scale, zero, bits, group_size)
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1 and torch.equal(q, q.round())
    w_hat = dequantize(q, scale, zero, group_size)
    # at most 2^b distinct values per group
    for g in group_view(w_hat, group_size).unbind(1):
        for row in g:
            assert row.unique().numel() <= 2 ** bits
    # quantizing the quantized weight again on the same grid gives it back exactly
    again = dequantize(quantize_to_int(w_hat, scale, zero, bits, group_size), scale, zero, group_size)
    assert torch.equal(again, w_hat)
    # RTN error is at most half a step everywhere inside the clipping range
    step = scale.repeat_interleave(w.shape[1] if group_size == -1 else group_size, 1)[:, :w.shape[1]]
    inside = (w_hat - w).abs() <= step / 2 + 1e-6
    assert inside.float().mean() > (0.9 if sym else 0.999)


@pytest.mark.parametrize("group_size", [-1, 8, 16])  # 16: ragged
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("with_offset", [False, True])
def test_fused_weight_quantizer_matches_autograd(group_size, sym, with_offset):
    """The in-place fake-quant with hand-written gradients gives the same bits as
    dequantize(quantize_to_int(...)) and the same gradients for offsets and clipping."""
    w = rand_weight(seed=1) * 3
    groups = num_groups(w.shape[1], group_size)
    gen = torch.Generator().manual_seed(2)
    mults = [torch.rand(w.shape[0], groups, generator=gen).mul(0.5).add(0.5).requires_grad_() for _ in range(2)]
    offset = (torch.rand(w.shape, generator=gen) - 0.5).requires_grad_() if with_offset else None
    upstream = torch.randn(w.shape, generator=gen)
    results = []
    for fused in (False, True):
        scale, zero = minmax_grid(w, 3, group_size, sym, *mults)
        out = (fake_quantize_weight(w, scale, zero, 3, group_size, offset) if fused
               else dequantize(quantize_to_int(w, scale, zero, 3, group_size, offset), scale, zero, group_size))
        inputs = [*mults] + ([offset] if with_offset else [])
        results.append((out.detach(), torch.autograd.grad(out, inputs, upstream)))
    (ref, ref_grads), (out, grads) = results
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ragged_last_group_gets_its_own_range():
    w = torch.zeros(1, 10)
    w[0, 8:] = torch.tensor([100.0, -100.0])  # the last (ragged) group of 2 holds the outliers
    w[0, :8] = torch.linspace(-1, 1, 8)
    assert num_groups(10, 4) == 3
    scale, _ = minmax_grid(w, 4, 4, False)
    assert scale[0, 0] < 1 and scale[0, 2] > 10
    assert (fake_quantize(w, 4, 4, False)[0, :8] - w[0, :8]).abs().max() < 0.2


def test_symmetric_grid_is_centered_on_zero():
    w = rand_weight()
    _, zero = minmax_grid(w, 4, 8, True)
    assert torch.all(zero == 8)


def test_lora_parameter_count_and_hard_rounding_near_rtn():
    lin = torch.nn.Linear(40, 12, bias=False)
    with torch.no_grad():
        lin.weight.copy_(rand_weight())
    rank = 3
    ql = QuantLinear(lin, UniformGrid(3, 8, False), LoraRound(rank=rank), lwc=False)
    assert sum(p.numel() for p in ql.parameters()) == (12 + 40) * rank
    # push the low-rank offset far so that many weights flip, then hard-round
    with torch.no_grad():
        ql.lora_b.normal_(0, 5)
    ql.freeze()
    qw = ql.frozen
    rtn_q = quantize_to_int(lin.weight, qw.scale, qw.zero, 3, 8)
    diff = (qw.q.float() - rtn_q).abs()
    assert diff.max() <= 1 and diff.sum() > 0
    assert torch.equal(qw.dequantize(), dequantize(qw.q, qw.scale, qw.zero, 8))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 16])  # 16: ragged last group
@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_loses_to_minmax_and_wins_at_low_bits(bits, group_size, sym):
    w = rand_weight(out=32, cin=40, seed=1)
    w[0, 3] = 8.0  # a heavy outlier: clipping it is not worth its group's resolution
    ratio = search_clip(w, bits, group_size, sym)
    assert ratio.shape == (32, num_groups(40, group_size))
    assert all(any(abs(r - c) < 1e-6 for c in CLIP_RATIOS) for r in ratio.flatten().tolist())

    def group_errors(mult):
        scale, zero = minmax_grid(w, bits, group_size, sym, mult, mult)
        w_hat = dequantize(quantize_to_int(w, scale, zero, bits, group_size), scale, zero, group_size)
        return group_view((w - w_hat) ** 2, group_size).sum(-1)
    searched, minmax = group_errors(ratio), group_errors(torch.ones_like(ratio))
    assert (searched <= minmax).all()
    if bits <= 3:
        assert searched.sum() < 0.95 * minmax.sum()


def test_clip_search_sets_the_starting_clip_learned_or_fixed():
    layer = torch.nn.Linear(40, 12, bias=False)
    layer.weight.data = rand_weight()
    ratio = search_clip(layer.weight, 3, 8, False)
    learned = QuantLinear(layer, UniformGrid(3, 8, False), SignRound(), lwc=True, clip_search=True)
    fixed = QuantLinear(layer, UniformGrid(3, 8, False), Nearest(), lwc=False, clip_search=True)
    assert torch.equal(learned.max_mult.detach(), ratio) and learned.max_mult.requires_grad
    assert torch.equal(fixed.min_mult, ratio) and not any(p.numel() for p in fixed.parameters())
    scale, zero = minmax_grid(layer.weight, 3, 8, False, ratio, ratio)
    fixed.freeze()
    assert torch.equal(fixed.frozen.scale, scale)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_output_error_is_below_rtn(act_order, clip_search):
    from crossblock.engine.gptq import HessianAccumulator, gptq_quantize
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=gen) @ torch.randn(48, 48, generator=gen)  # correlated inputs
    x[:, 5] *= 10  # one loud channel, where act_order matters
    w = torch.randn(16, 48, generator=gen)
    acc = HessianAccumulator(48, "cpu")
    acc.add(x)
    unrounded, scale, zero = gptq_quantize(w, acc.h, 3, 16, False, act_order=act_order, clip_search=clip_search)
    q = quantize_to_int(unrounded, scale, zero, 3, 16)
    assert q.min() >= 0 and q.max() <= 7
    w_gptq = dequantize(q, scale, zero, 16)

    def out_err(w_hat):
        return ((x @ (w - w_hat).t()) ** 2).sum()
    assert out_err(w_gptq) < 0.8 * out_err(fake_quantize(w, 3, 16, False))


def test_diagonal_hessian_is_the_full_ones_diagonal():
    """init imatrix keeps only 2·x² per input (a vector): the full accumulator's diagonal, batch
    after batch (the running mean's reweighting included)."""
    from crossblock.engine.gptq import HessianAccumulator
    gen = torch.Generator().manual_seed(0)
    full, diag = HessianAccumulator(40, "cpu"), HessianAccumulator(40, "cpu", diagonal=True)
    for n in (7, 64, 3):
        x = torch.randn(2, n, 40, generator=gen) * torch.linspace(0.1, 10, 40)
        full.add(x)
        diag.add(x)
    assert diag.h.shape == (40,) and diag.count == full.count == 148
    assert torch.allclose(diag.h, torch.diagonal(full.h), rtol=1e-5)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_in_place_integers_and_decode_equal_the_differentiable_ones(group_size):
    """Freezing and decoding without gradients run in place (one weight-sized tensor): the same
    bits as the autograd expressions, and the caller's tensors untouched."""
    w = rand_weight(cin=40)
    scale, zero = minmax_grid(w, 3, group_size, False)
    offset = torch.rand_like(w) - 0.5
    for off in (None, offset):
        with torch.no_grad():
            q = quantize_to_int(w, scale, zero, 3, group_size, off)
        q_grad = quantize_to_int(w, scale.requires_grad_(), zero, 3, group_size, off)
        scale = scale.detach()
        assert torch.equal(q, q_grad.detach())
        with torch.no_grad():
            qf = q.clone()
            w_hat = dequantize(qf, scale, zero, group_size)
        assert torch.equal(qf, q)  # float integers are not decoded in place of the caller's
        assert torch.equal(w_hat, dequantize(q, scale.clone().requires_grad_(), zero, group_size).detach())
        assert torch.equal(w_hat, dequantize(q.to(torch.uint8), scale, zero, group_size))


def test_frozen_layer_keeps_integers_not_a_float_copy(monkeypatch):
    """A frozen layer holds its uint8 integers and per-group grid, decoded at each use: no
    float32 weight-sized cache (a bf16 model's frozen blocks would take 3x their weights);
    decoded a few rows at a time into a bf16 weight, the same bits as decoded whole."""
    import crossblock.quant.linear as ql_module
    monkeypatch.setattr(ql_module, "DECODE_ROWS_ELEMENTS", 64 * 5)  # 5 rows per slice: 7 slices, one short
    lin = torch.nn.Linear(64, 32, bias=False)
    ql = QuantLinear(lin, UniformGrid(bits=4, group_size=16), Nearest())
    ql.freeze()
    tensors = [t for t in [*ql.parameters(), *ql.buffers()] if t is not None]
    weight_sized = [t for t in tensors if t.numel() >= lin.weight.numel()]
    assert [t.dtype for t in weight_sized] == [torch.uint8]
    assert torch.equal(ql.quantized_weight(), ql.grid.decode(ql.q, ql.scale, ql.zero))
    assert torch.equal(ql.weight_as(torch.bfloat16), ql.quantized_weight().to(torch.bfloat16))
    x = torch.randn(5, 64)
    ql.mode = "hard"
    assert torch.equal(ql(x), torch.nn.functional.linear(x, ql.restore().weight))


def test_hessian_is_a_float32_product_inside_bf16_autocast():
    """The engine's hooks fire inside its bf16 autocast on CUDA; a bf16 x xᵀ made GPTQ's Cholesky
    fail on a bf16 model there."""
    from crossblock.engine.gptq import HessianAccumulator
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    plain, autocast = HessianAccumulator(96, "cpu"), HessianAccumulator(96, "cpu")
    plain.add(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.add(x)
    assert torch.equal(plain.h, autocast.h)


def test_gptq_damps_an_indefinite_hessian_more_or_says_why():
    from crossblock.engine.gptq import gptq_quantize
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    h = torch.eye(32)
    h[5, 5] = -0.05  # not positive definite at 1% damping, positive at 10%
    wq, scale, zero = gptq_quantize(w, h, 4, 16, False)
    assert torch.isfinite(wq).all() and torch.isfinite(scale).all()
    h[5, 5] = -100.0
    with pytest.raises(CrossblockError, match="not positive definite even at damping 1"):
        gptq_quantize(w, h, 4, 16, False)


@pytest.mark.parametrize("grid", [UniformGrid(3, 32, False), UniformGrid(4, 64, True), GgufGrid("Q4_0"),
                                  GgufGrid("Q3_K"), GgufGrid("Q4_K"), Nvfp4Grid(), Mxfp4Grid()],
                         ids=lambda g: getattr(g, "quant", None) or type(g).__name__)
def test_importance_weighted_clip_search_lowers_the_weighted_error(grid):
    """init imatrix's search: with the inputs' mean squares as column weights, the chosen clipping's
    weighted error is below both the unweighted search's and the min/max grid's."""
    w = rand_weight(out=64, cin=256, seed=2)
    w[:, ::32] *= 4  # an outlier column per 32 ...
    importance = torch.ones(256)
    importance[::32] = 50.0  # ... where the inputs are largest: clipping it costs more than it gains

    def weighted_error(ratio):
        return ((grid.fake_quantize(w, *grid.params(w, ratio, ratio)) - w) ** 2 * importance).sum().item()
    weighted, plain = grid.search_clip(w, importance), grid.search_clip(w)
    assert weighted.shape == plain.shape
    assert weighted_error(weighted) < weighted_error(plain)
    assert weighted_error(weighted) <= weighted_error(torch.ones_like(weighted))


@pytest.mark.parametrize("lwc", [True, False])
def test_start_clip_sets_the_clipping_learned_or_fixed(lwc):
    layer = torch.nn.Linear(40, 12, bias=False)
    layer.weight.data = rand_weight()
    ratio = torch.full((12, 5), 0.8)
    ql = QuantLinear(layer, UniformGrid(3, 8, False), SignRound() if lwc else Nearest(), lwc=lwc)
    ql.start_clip(ratio)
    assert torch.equal(ql.max_mult.detach(), ratio) and torch.equal(ql.min_mult.detach(), ratio)
    assert ql.max_mult.requires_grad == lwc
    scale, zero = minmax_grid(layer.weight, 3, 8, False, ratio, ratio)
    ql.freeze()
    assert torch.equal(ql.frozen.scale, scale) and torch.equal(ql.frozen.zero, zero)
