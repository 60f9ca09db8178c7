"""`lorafold train` on a GPU loads the frozen base in bf16 and keeps fp32 LoRA master weights:
the adapters' parameters, gradients and optimizer updates stay float32 over a 16-bit base
(checked here on a bf16 base on the CPU), and their output matches a float64 computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear
from lorafold.training.adapters.usv import USVLinear


@pytest.mark.parametrize("make", [lambda b: LoRALinear(b, r=4, alpha=8), lambda b: USVLinear(b, r0=4, r_max=8)])
def test_adapters_keep_fp32_master_weights_over_a_bf16_base(make) -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24).to(torch.bfloat16)
    layer = make(base)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(5, 32).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    if isinstance(layer, LoRALinear):  # the delta, rounded once into bf16
        ref = x.double() @ layer.delta_weight().double().T
        torch.testing.assert_close(y.double() - base(x).double(), ref, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-4)
    opt.step()
    # an update far below bf16's resolution of the weights still lands in fp32
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert base.weight.dtype == torch.bfloat16 and base.weight.grad is None


def test_train_setup_loads_the_base_by_device(monkeypatch) -> None:
    """_setup asks the loader for dtype auto on the training device (bf16 on a GPU)."""
    from lorafold.server.models import loader
    from lorafold.training.trainer import loop

    seen = {}

    def fake_load(source, *, dtype, device, name=None):  # noqa: ANN001, ANN202
        seen.update(dtype=dtype, device=device)
        raise RuntimeError("stop after the load call")

    monkeypatch.setattr(loader, "load_base_model", fake_load)
    with pytest.raises(RuntimeError, match="stop after"):
        loop._setup(type("Cfg", (), {"seed": 0, "model": None})(), None, torch.device("cpu"))
    assert seen == {"dtype": "auto", "device": torch.device("cpu")}
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.float32
