"""AdaPreLoRA's compiled CPU step against its torch path, on real LoRA pairs of a tiny Llama.

The two paths compute the same update in float32 with different summation orders, so they
agree to float32 rounding per step (checked at 1e-4 relative over several steps, where a
wrong term in any pass is off by far more). Both keep the same optimizer state.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lorafold.training.adapters.lora import inject_lora, lora_pairs
from lorafold.training.optim.adaprelora import AdaPreLoRA, FullGradCapture
from tests.conftest import build_tiny_llama, require_cpu_kernels
from tests.training.helpers import fixed_batch_losses

STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _kernels() -> None:
    require_cpu_kernels()


def _model(seed: int = 0) -> torch.nn.Module:
    """Mixed shapes (hidden 72, intermediate 136, kv 24) and two ranks (8 with in-place rows,
    5 through the padded copies), with B ≠ 0 so every term of the step is live."""
    torch.manual_seed(seed)
    model = build_tiny_llama(seed=seed, num_hidden_layers=2)
    inject_lora(model, r=8, alpha=16, rank_pattern={"v_proj": 5, "down_proj": 5})
    with torch.no_grad():
        for p in lora_pairs(model):
            p.B.normal_(0.0, 0.02)
    return model


def _grads(model: torch.nn.Module, step: int) -> None:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(step))
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()


def _run(backend: str, steps: int = STEPS, **kw) -> tuple[torch.nn.Module, AdaPreLoRA]:
    model = _model()
    opt = AdaPreLoRA(lora_pairs(model), lr=3e-3, backend=backend, **kw)
    for step in range(steps):
        _grads(model, step)
        opt.step()
    return model, opt


@torch.no_grad()
def _max_rel(m1: torch.nn.Module, m2: torch.nn.Module) -> float:
    """Largest factor difference relative to the factor's largest entry; inf for non-finite."""
    worst = 0.0
    for p1, p2 in zip(lora_pairs(m1), lora_pairs(m2), strict=True):
        for t1, t2 in ((p1.A, p2.A), (p1.B, p2.B)):
            if not (torch.isfinite(t1).all() and torch.isfinite(t2).all()):
                return float("inf")
            worst = max(worst, float((t1 - t2).abs().max() / t2.abs().max().clamp_min(1e-30)))
    return worst


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"weight_decay": 0.1},
        {"beta1": 0.9},
        {"stat_interval": 3},
    ],
    ids=["default", "weight_decay", "momentum", "stat_interval"],
)
def test_compiled_step_equals_torch_path(kw: dict) -> None:
    compiled, opt_c = _run("cpp", **kw)
    reference, opt_t = _run("torch", **kw)
    start = _model()
    moved = _max_rel(compiled, start)
    assert moved > 1e-3, "the factors must have moved for the comparison to mean anything"
    assert _max_rel(compiled, reference) < 1e-4
    for p_c, p_t in zip(lora_pairs(compiled), lora_pairs(reference), strict=True):
        st_c, st_t = opt_c.state[p_c.A], opt_t.state[p_t.A]
        assert st_c["step"] == st_t["step"] == STEPS and st_c["stat_at"] == st_t["stat_at"]
        for key in ("row_sq", "col_sq"):
            assert torch.allclose(st_c[key], st_t[key], rtol=1e-4, atol=1e-12 * float(st_t[key].abs().max()))
        if kw.get("beta1"):
            for t_c, t_t in ((p_c.A, p_t.A), (p_c.B, p_t.B)):
                m_c, m_t = opt_c.state[t_c]["momentum"], opt_t.state[t_t]["momentum"]
                assert float((m_c - m_t).abs().max()) < 1e-4 * float(m_t.abs().max())


def test_full_statistic_compiled_equals_torch_path() -> None:
    results = []
    for backend in ("cpp", "torch"):
        model = _model()
        capture = FullGradCapture(model)
        opt = AdaPreLoRA(lora_pairs(model), lr=3e-3, statistic="full", full_grad_fn=capture, backend=backend)
        for step in range(3):
            _grads(model, step)
            opt.step()
            capture.clear()
        results.append(model)
    assert _max_rel(results[0], results[1]) < 1e-4


def test_auto_takes_the_compiled_path_for_float32_and_state_carries_across_paths() -> None:
    model = _model()
    opt = AdaPreLoRA(lora_pairs(model), lr=3e-3)
    _grads(model, 0)
    assert opt._use_compiled(opt.active_pairs(opt.param_groups[0]))
    # three compiled steps, then three torch steps from the same state == six torch steps
    for step in range(3):
        _grads(model, step)
        opt.step()
    opt.backend = "torch"
    for step in range(3, STEPS):
        _grads(model, step)
        opt.step()
    reference, _ = _run("torch")
    assert _max_rel(model, reference) < 1e-4


def test_forced_cpp_backend_refuses_what_it_cannot_run() -> None:
    model = _model().double()
    opt = AdaPreLoRA(lora_pairs(model), lr=3e-3, backend="cpp")
    _grads(model, 0)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        opt.step()
    with pytest.raises(ValueError, match="backend must be"):
        AdaPreLoRA(lora_pairs(model), backend="gpu")
    # auto falls back to torch for float64 and still trains
    before = copy.deepcopy(model)
    AdaPreLoRA(lora_pairs(model), lr=3e-3).step()
    assert _max_rel(model, before) > 0


def test_zero_b_start_trains_on_the_compiled_path() -> None:
    """PEFT init (B = 0: BᵀLB is zero before damping, the statistic's pinv of BᵀB is δ⁻¹ I):
    the compiled step stays finite and brings a fixed batch's loss down."""
    model = build_tiny_llama(seed=1, num_hidden_layers=1)
    inject_lora(model, r=8, alpha=16)
    opt = AdaPreLoRA(lora_pairs(model), lr=3e-3, backend="cpp")
    losses = fixed_batch_losses(model, opt, steps=20, vocab=256)
    assert all(torch.isfinite(p.A).all() and torch.isfinite(p.B).all() for p in lora_pairs(model))
    assert any(float(p.B.detach().abs().max()) > 0 for p in lora_pairs(model))
    assert losses[-1] < 0.95 * losses[0], losses


def test_layer_needing_the_eigh_pseudo_inverse_takes_the_torch_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank-deficient B with δ = 1e-16: its BᵀB + δI fails pinv's exactness bound, so the
    kernel leaves that layer untouched and the optimizer steps it through the torch path.
    One step: with an inverse of ~1e16 in the loop, later steps amplify rounding chaotically."""

    def deficient() -> torch.nn.Module:
        model = _model()
        with torch.no_grad():
            pair = lora_pairs(model)[0]
            pair.B[:, 1] = pair.B[:, 0]  # two equal columns: BᵀB singular
        return model

    fallbacks: list[list[str]] = []
    original = AdaPreLoRA._step_pairs_torch

    def spy(self, group, pairs):  # noqa: ANN001, ANN202
        fallbacks.append([p.name for p in pairs])
        return original(self, group, pairs)

    results = []
    for backend in ("cpp", "torch"):
        model = deficient()
        opt = AdaPreLoRA(lora_pairs(model), lr=3e-3, damping=1e-16, backend=backend)
        if backend == "cpp":
            monkeypatch.setattr(AdaPreLoRA, "_step_pairs_torch", spy)
        _grads(model, 0)
        opt.step()
        monkeypatch.setattr(AdaPreLoRA, "_step_pairs_torch", original)
        results.append((model, opt))
    first = lora_pairs(results[0][0])[0].name
    assert fallbacks == [[first]], fallbacks
    assert _max_rel(results[0][0], results[1][0]) < 1e-4
    assert results[0][1].state[lora_pairs(results[0][0])[0].A]["step"] == 1


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_step_bumps_the_factors_version_like_an_inplace_op(backend: str) -> None:
    """A graph that saved the old factors must refuse to backpropagate after the step."""
    model = _model()
    opt = AdaPreLoRA(lora_pairs(model), lr=3e-3, backend=backend)
    _grads(model, 0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    stale = model(ids, labels=ids).loss  # its graph holds the factors as they are now
    pair = lora_pairs(model)[0]
    before = (pair.A._version, pair.B._version)
    opt.step()
    assert pair.A._version > before[0] and pair.B._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()
