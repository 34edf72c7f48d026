import pytest
import torch
import transformers as T
from torch import nn

from crossblock.errors import CrossblockError
from crossblock.model.adapter import block_linears, capture, find_blocks
from crossblock.grids import UniformGrid
from crossblock.roundings import Nearest
from crossblock.quant.linear import QuantLinear, weight_of

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, SMALL),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, SMALL),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(SMALL, head_dim=8)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, SMALL),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(SMALL, head_dim=8)),
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                               num_attention_heads=4, vocab_size=100, word_embed_proj_dim=32)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                   bos_token_id=0, eos_token_id=0)),
}


def tiny(family):
    torch.manual_seed(0)
    config_cls, model_cls, kw = FAMILIES[family]
    return model_cls(config_cls(**kw)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_run_standalone_reproduce_the_model(family):
    model = tiny(family)
    ids = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    x, calls = capture(model, ids, batch_size=2)  # batch 2 + 1: captured kwargs must broadcast
    _, blocks = find_blocks(model)
    got = {}
    hook = blocks[-1].register_forward_hook(lambda m, a, o: got.update(out=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(ids, use_cache=False)
        h = x
        for block, call in zip(blocks, calls):
            h = call(block, h)
    hook.remove()
    assert x.shape == (3, 16, 32)
    torch.testing.assert_close(h, got["out"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_linears_found_in_every_family(family):
    model = tiny(family)
    _, blocks = find_blocks(model)
    names = [n for n, _ in block_linears(blocks[0])]
    assert len(names) >= 4  # attention projections and MLP
    assert len(blocks) == 2


def test_conv1d_is_wrapped_in_out_in_layout():
    model = tiny("gpt2")
    _, blocks = find_blocks(model)
    conv = dict(block_linears(blocks[0]))["attn.c_attn"]
    assert type(conv).__name__ == "Conv1D"
    ql = QuantLinear(conv, UniformGrid(8, -1, False), Nearest())
    x = torch.randn(2, 5, 32)
    ql.mode = "fp"
    torch.testing.assert_close(ql(x), conv(x))
    assert weight_of(conv).shape == (96, 32)


def test_unsupported_architecture_names_what_was_found():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.LayerNorm(4), nn.ReLU()])

    with pytest.raises(CrossblockError, match="unsupported architecture NoBlocks.*layers"):
        find_blocks(NoBlocks())


def test_readme_support_row_is_the_architecture_table():
    """#28: the README's family support comes from the one table (model/architectures.py)."""
    from pathlib import Path
    from crossblock.model.architectures import support_row
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support_row() in readme, "regenerate the README row: python -c 'from crossblock.model.architectures " \
                                    "import support_row; print(support_row())'"
