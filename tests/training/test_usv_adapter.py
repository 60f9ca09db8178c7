"""USVLinear: forward, gradient probes, injection by module name, rank state, PEFT export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorafold.training.adapters.usv import USVLinear, inject_usv, usv_triples
from lorafold.training.export_usv import balanced_factors, export_usv_model
from lorafold.training.optim.geolora import GeoLoRA
from lorafold.training.optim.testbed import single_thread
from lorafold.training.optim.usv_testbed import fixed_batch, tiny_llama, train_llama


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _layer(r0: int = 3, r_max: int = 6, seed: int = 0) -> USVLinear:
    torch.manual_seed(seed)
    base = nn.Linear(7, 9, bias=True, dtype=torch.float64)
    layer = USVLinear(base, r0=r0, r_min=1, r_max=r_max, alpha=0.7)
    with torch.no_grad():
        layer.S[:r0, :r0] = torch.randn(r0, r0, dtype=torch.float64)
    return layer


def test_init_is_base_and_orthonormal() -> None:
    torch.manual_seed(0)
    base = nn.Linear(7, 9, dtype=torch.float64)
    layer = USVLinear(base, r0=3, r_max=6)
    x = torch.randn(5, 7, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))
    U, S, V = layer.factors()
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=1e-12) and torch.allclose(V.T @ V, eye, atol=1e-12)
    assert S.abs().max() == 0 and layer.U[:, 3:].abs().max() == 0


def test_forward_and_gradients_match_dense_reference() -> None:
    layer = _layer()
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    U, S, V = (t.detach() for t in layer.factors())
    W = layer.base.weight + 0.7 * U @ S @ V.T
    assert torch.allclose(y, x @ W.T + layer.base.bias, atol=1e-13)
    gy = torch.randn_like(y)
    y.backward(gy)
    G_Z = 0.7 * gy.reshape(-1, 9).T @ x.detach().reshape(-1, 7)  # ∂L/∂(U S Vᵀ)
    gk, gl = layer.probe_grads()
    r = layer.rank
    assert torch.allclose(gk, G_Z @ V, atol=1e-12) and torch.allclose(gl, G_Z.T @ U, atol=1e-12)
    assert torch.allclose(layer.U.grad[:, :r], G_Z @ V @ S.T, atol=1e-12)
    assert torch.allclose(layer.S.grad[:r, :r], U.T @ G_Z @ V, atol=1e-12)
    assert torch.allclose(layer.V.grad[:, :r], G_Z.T @ U @ S, atol=1e-12)
    assert layer.U.grad[:, r:].abs().max() == 0
    assert torch.allclose(x.grad, gy @ W, atol=1e-12)


def test_probe_grads_accumulate_and_clear() -> None:
    layer = _layer()
    x = torch.randn(3, 7, dtype=torch.float64)
    layer(x).sum().backward()
    once = layer.probe_grads()[0].clone()
    layer(x).sum().backward()
    assert torch.allclose(layer.probe_grads()[0], 2 * once)
    layer.clear_probe_grads()
    assert layer.probe_grads() is None


def test_rank_survives_state_dict_roundtrip() -> None:
    layer = _layer(r0=3)
    other = _layer(r0=5, seed=1)
    other.load_state_dict(layer.state_dict())
    assert other.rank == 3
    x = torch.randn(4, 7, dtype=torch.float64)
    assert torch.allclose(other(x), layer(x))
    with pytest.raises(ValueError, match="outside"):
        layer.set_rank(7)


def test_inject_replaces_targets_and_triples_are_by_module() -> None:
    model = tiny_llama()
    ids = fixed_batch(batch=2, seq=8)
    before = model(input_ids=ids).logits
    mods = inject_usv(model, r0=4, r_max=16)
    assert len(mods) == 2 * 7
    assert all(isinstance(model.get_submodule(name), USVLinear) for name in mods)
    assert torch.equal(model(input_ids=ids).logits, before)  # S = 0: starts at the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{f}" for name in mods for f in ("U", "S", "V")}
    triples = usv_triples(model)
    assert [t.name for t in triples] == list(mods)
    for t in triples:
        assert t.module is mods[t.name]
        assert t.U.data_ptr() == t.module.U.data_ptr() and t.U.shape == (t.module.out_features, 4)
    # k_proj is [32, 64]: r_max must be capped at min(m, n) only when needed.
    assert mods["model.layers.0.self_attn.k_proj"].r_max == 16


def test_balanced_factors_reproduce_delta_and_balance() -> None:
    layer = _layer(r0=4)
    A, B = balanced_factors(layer)
    assert torch.allclose(B @ A, layer.delta_weight().detach(), atol=1e-12)
    assert torch.allclose(B.T @ B, A @ A.T, atol=1e-12)


def test_exported_adapter_matches_trained_model_in_peft(tmp_path) -> None:
    from peft import PeftModel

    base = tiny_llama(seed=3)
    model = copy.deepcopy(base)
    inject_usv(model, r0=4, r_max=16, alpha=2.0)
    opt = GeoLoRA(model, lr=3e-2, coefficient_steps=4, tau=0.3, weight_decay=0.0)
    ids = fixed_batch(seed=3)
    train_llama(model, opt, ids, 10)  # ends on coefficient steps: S is not diagonal
    ranks = set(opt.ranks().values())
    assert len(ranks) > 1, f"want mixed ranks to exercise rank_pattern, got {ranks}"
    assert any(not torch.allclose(t.S, torch.diag(torch.diagonal(t.S))) for t in usv_triples(model))
    folder = export_usv_model(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-5
    with peft_model.disable_adapter(), torch.no_grad():
        plain = peft_model(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter matters, so the test can fail
