"""oneDNN-packed base weights (server.models.packed_linear): same results as F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafold.server.lora.layers import MultiLoRALinear
from lorafold.server.models.packed_linear import PackedLinear, can_prepack, packed_linear, prepack

pytestmark = pytest.mark.skipif(not can_prepack(torch.zeros(1)), reason="this torch build has no oneDNN packed linear")


@pytest.mark.parametrize("rows", [0, 1, 7, 64, 300])
def test_packed_linear_matches_f_linear(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(rows, 40, generator=gen)
    ref = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(packed_linear(x, prepack(w), b).double(), ref, rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 40, generator=gen)  # leading batch dims as in F.linear
    torch.testing.assert_close(packed_linear(x3, prepack(w), None), F.linear(x3, w), rtol=1e-5, atol=1e-5)


def test_packed_linear_module_falls_back_to_autograd() -> None:
    lin = nn.Linear(16, 8)
    packed = PackedLinear(lin)
    x = torch.randn(5, 16, requires_grad=True)
    packed(x).sum().backward()  # gradients on: the dense nn.Linear runs
    assert x.grad is not None and lin.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)
    assert packed.weight is lin.weight


def test_multilora_prepacked_base_gives_the_same_output() -> None:
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(24, 32), [20, 12], num_slots=2, rows=8)
    x = torch.randn(9, 24)
    with torch.no_grad():
        dense = layer(x)
        assert layer.prepack_base()
        torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
    assert not MultiLoRALinear(nn.Linear(4, 4).double(), [4], num_slots=1, rows=4).prepack_base(), "fp64 is not packed"


def test_serve_flag_turns_prepacking_off_end_to_end() -> None:
    """`lorafold serve --no-prepack-weights` reaches the engine config; the lean decoder then
    holds no packed weights (and does by default)."""
    import argparse
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafold.server.api.cli_entry import settings_from_args
    from lorafold.server.engine.llama import LeanLlama

    off = settings_from_args(argparse.Namespace(prepack_weights=False)).engine
    on = settings_from_args(argparse.Namespace()).engine
    assert off.prepack_weights is False and on.prepack_weights is True
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2))
    packed = LeanLlama(copy.deepcopy(hf), num_slots=1, rows=4, prepack=on.prepack_weights)
    plain = LeanLlama(copy.deepcopy(hf), num_slots=1, rows=4, prepack=off.prepack_weights)
    assert packed.layers[0].qkv._packed is not None and isinstance(packed.lm_head, PackedLinear)
    assert plain.layers[0].qkv._packed is None and not isinstance(plain.lm_head, PackedLinear)
