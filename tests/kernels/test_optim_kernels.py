"""AdaPreLoRA's compiled step (`kernels/csrc/optim_ops.cpp`: `adapre_step`) against the torch
path's step in float64, the reference implementation of the math.

Shapes cover what the kernel tiles differently: ranks that are and are not multiples of 8
(rows read in place vs through the padded copy), row counts with and without a tail after
the whole 24-row groups, column counts that are not multiples of the 16-column blocks, and
layers so small that every tile is padding. A layer whose rank exceeds a side has
rank-deficient Grams: the kernel hands it to the torch path (the statistic's pseudo-inverse
needs eigh), and the comparison skips it, since in float32 the method turns such layers to
NaN on the torch path as well (measured here: ranks 8, 12, 40 on the 7 x 5 and 1 x 1 layers;
float64 stays finite). Three steps with ``stat_interval=2`` run the
kernel with and without the statistic; the fold into the Adafactor state is compared too.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lorafold.kernels import cpu_ops
from lorafold.training.adapters.lora import LoRAPair
from lorafold.training.optim.adaprelora import AdaPreLoRA
from tests.conftest import require_cpu_kernels

SHAPES = [(576, 576), (192, 576), (1536, 576), (33, 129), (7, 5), (1, 1), (250, 17), (48, 40), (100, 70)]
RANKS = [1, 3, 8, 12, 16, 24, 40]
STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def _kernels() -> None:
    require_cpu_kernels()


def _pairs(r: int, dtype: torch.dtype, seed: int) -> list[LoRAPair]:
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for i, (m, n) in enumerate(SHAPES):
        a = torch.randn(r, n, generator=gen, dtype=torch.float64) / n**0.5
        b = torch.randn(m, r, generator=gen, dtype=torch.float64) / r**0.5
        pairs.append(LoRAPair(f"layer{i}", nn.Parameter(a.to(dtype)), nn.Parameter(b.to(dtype)), 1.5))
    return pairs


def _set_grads(pairs: list[LoRAPair], step: int) -> None:
    """The gradients autograd gives for a loss gradient G [m, n] on ΔW = s B A:
    g_A = s BᵀG, g_B = s G Aᵀ (the statistic's quadratic forms assume that structure)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in pairs:
        a, b = p.A.detach().to(torch.float64), p.B.detach().to(torch.float64)
        g = torch.randn(b.shape[0], a.shape[1], generator=gen, dtype=torch.float64)
        p.A.grad = (p.scale * b.T @ g).to(p.A.dtype)
        p.B.grad = (p.scale * g @ a.T).to(p.B.dtype)


def _run(pairs: list[LoRAPair], backend: str, **kw) -> AdaPreLoRA:
    opt = AdaPreLoRA(pairs, lr=1e-2, stat_interval=2, backend=backend, **kw)
    for step in range(STEPS):
        _set_grads(pairs, step)
        opt.step()
    return opt


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().to(torch.float64), ref.detach()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _tensors(opt: AdaPreLoRA, p: LoRAPair) -> list[torch.Tensor]:
    """What a step writes for one layer: factors, Adafactor state, momentum (when on)."""
    st = opt.state[p.A]
    out = [p.A, p.B, st["row_sq"], st["col_sq"]]
    if "momentum" in opt.state[p.B]:
        out += [opt.state[p.A]["momentum"], opt.state[p.B]["momentum"]]
    return out


@pytest.mark.parametrize("kw", [{}, {"beta1": 0.9, "weight_decay": 0.1}], ids=["plain", "momentum_decay"])
@pytest.mark.parametrize("r", RANKS)
def test_compiled_step_matches_the_float64_torch_step(r: int, kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor the step writes is as close to the float64 step as the float32 torch
    path's (within 4x, floor 2e-6 relative to the tensor's largest entry; measured: the
    kernel at most 2.2x the torch path's, both ~1e-7 except at r = n, ~1e-4)."""
    reference = _pairs(r, torch.float64, seed=r)
    opt_ref = _run(reference, "torch", **kw)
    torch32 = _pairs(r, torch.float32, seed=r)
    opt_t32 = _run(torch32, "torch", **kw)
    compiled = _pairs(r, torch.float32, seed=r)
    handed: set[str] = set()
    torch_step = AdaPreLoRA._step_pairs_torch

    def spy(self, group, pairs):  # noqa: ANN001, ANN202
        handed.update(p.name for p in pairs)
        return torch_step(self, group, pairs)

    monkeypatch.setattr(AdaPreLoRA, "_step_pairs_torch", spy)
    opt = _run(compiled, "cpp", **kw)
    # only a layer whose rank exceeds a side (rank-deficient Grams: the statistic's
    # pseudo-inverse needs eigh) may be handed to the torch path; every other one is the kernel's
    deficient = {f"layer{i}" for i, (m, n) in enumerate(SHAPES) if r > min(m, n)}
    assert handed <= deficient, handed - deficient
    start = _pairs(r, torch.float64, seed=r)
    for p, q, t, p0 in zip(compiled, reference, torch32, start, strict=True):
        if p.name in deficient:  # float32 AdaPreLoRA loses these on either path (NaN); float64 does not
            continue
        assert _rel(q.A, p0.A) > 1e-3, "the factors must have moved for the comparison to mean anything"
        assert opt.state[p.A]["step"] == opt_ref.state[q.A]["step"] == STEPS
        assert opt.state[p.A]["stat_at"] == opt_ref.state[q.A]["stat_at"] == STEPS
        for x, ref, x32 in zip(_tensors(opt, p), _tensors(opt_ref, q), _tensors(opt_t32, t), strict=True):
            assert _rel(x, ref) <= max(2e-6, 4 * _rel(x32, ref)), p.name


def test_failed_weighted_inverse_uses_the_identity_like_the_torch_path(caplog: pytest.LogCaptureFixture) -> None:
    """B = 0 and δ = 0: BᵀLB is zero, its Cholesky fails; both paths use the identity and warn.
    (The exact statistic: the low-rank one's pinv of BᵀB would take the torch path first.)"""
    results = []
    for backend, dtype in (("cpp", torch.float32), ("torch", torch.float64)):
        pairs = _pairs(8, dtype, seed=3)
        with torch.no_grad():
            for p in pairs:
                p.B.zero_()
        gen = torch.Generator().manual_seed(7)
        full = {p.name: torch.randn(p.B.shape[0], p.A.shape[1], generator=gen, dtype=torch.float64) for p in pairs}
        opt = AdaPreLoRA(pairs, lr=1e-2, damping=0.0, statistic="full", full_grad_fn=full.__getitem__, backend=backend)
        _set_grads(pairs, 0)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            opt.step()
        assert any("Cholesky inverse failed" in rec.getMessage() for rec in caplog.records), backend
        results.append(pairs)
    for p, q in zip(*results, strict=True):
        assert _rel(p.A, q.A) < 1e-4 and _rel(p.B, q.B) < 1e-4, p.name


def _op_args(r: int = 8) -> dict:
    pairs = _pairs(r, torch.float32, seed=0)
    _set_grads(pairs, 0)
    return {
        "a": [p.A.detach() for p in pairs],
        "b": [p.B.detach() for p in pairs],
        "g_a": [p.A.grad for p in pairs],
        "g_b": [p.B.grad for p in pairs],
        "row_state": [torch.zeros(m) for m, _ in SHAPES],
        "col_state": [torch.zeros(n) for _, n in SHAPES],
        "mom_a": [],
        "mom_b": [],
        "scales": [1.0] * len(SHAPES),
        "inv_corr": [1.0] * len(SHAPES),
        "fold": [1.0] * len(SHAPES),
        "measure": True,
        "lr": 1e-3,
        "decay": 1.0,
        "beta1": 0.0,
        "eps": 1e-30,
        "damping": 1e-6,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda k: k["a"].__setitem__(1, torch.zeros(4, 576)), "one rank per call"),
        (lambda k: k["g_b"].__setitem__(0, k["g_b"][1]), "gB must have B's shape"),
        (lambda k: k["a"].__setitem__(0, k["a"][0].double()), "float32"),
        (lambda k: k["a"].__setitem__(0, k["a"][0].T.contiguous().T), "contiguous"),
        (lambda k: k["row_state"].__setitem__(0, torch.zeros(3)), "row_state must be"),
        (lambda k: k.__setitem__("mom_a", list(k["a"])), "both be given or both be empty"),
        (lambda k: k.__setitem__("fold", [1.0]), "fold must have one entry per layer"),
        (lambda k: k.__setitem__("scales", [1.0]), "one entry per layer"),
    ],
)
def test_bad_input_is_refused_with_a_message_and_nothing_is_written(change, message: str) -> None:  # noqa: ANN001
    kw = _op_args()
    change(kw)
    before = [t.clone() for t in kw["a"] + kw["b"]]
    with pytest.raises(RuntimeError, match=message):
        cpu_ops.adapre_step(**kw)
    assert all(torch.equal(x, y) for x, y in zip(kw["a"] + kw["b"], before, strict=True))
