"""ETF init (spec §9): exact tightness and unit norms; the known optimal coherence where one is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear
from lorafold.training.init.etf import coherence, etf_frame, init_etf, levenstein_bound, make_tight_unit, welch_bound
from lorafold.training.optim.testbed import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def frame_defect(a: torch.Tensor, optimum: float) -> str | None:
    """Why ``a`` [r, n] is not an optimal unit-norm tight frame of coherence ``optimum`` (None: it is).

    Checks the tight-frame residual ``‖AAᵀ − (n/r) I‖``, unit column norms, and the coherence
    against the known optimum (an achieved value *above* it is the failure that matters; below
    it is impossible for a true optimum and flags a wrong optimum in the table)."""
    r, n = a.shape
    residual = float((a @ a.T - (n / r) * torch.eye(r, dtype=a.dtype)).norm())
    if residual > 1e-10:
        return f"not tight: residual {residual:.2e}"
    norms = float((a.norm(dim=0) - 1).abs().max())
    if norms > 1e-12:
        return f"columns not unit norm: {norms:.2e}"
    mu = coherence(a)
    if abs(mu - optimum) > 1e-6:
        return f"coherence {mu:.8f}, optimum {optimum:.8f}"
    return None


# (r, n, the best coherence any n unit vectors in R^r can have). Where a real ETF exists it is
# the Welch bound: simplices (n = r + 1), the 6 icosahedron diagonals in R^3, the Petersen
# ETF (5, 10), (6, 16) and (7, 28) (Fickus & Mixon's table of real ETFs). In the plane no ETF
# exists beyond n = 3; the optimum is n equally spaced lines, cos(π/n). n = r: an orthonormal
# basis, 0.
KNOWN_OPTIMA = [
    (4, 4, 0.0),
    (2, 3, welch_bound(2, 3)), (5, 6, welch_bound(5, 6)), (8, 9, welch_bound(8, 9)),
    (3, 6, welch_bound(3, 6)), (5, 10, welch_bound(5, 10)), (6, 16, welch_bound(6, 16)), (7, 28, welch_bound(7, 28)),
    (2, 4, math.cos(math.pi / 4)), (2, 5, math.cos(math.pi / 5)), (2, 7, math.cos(math.pi / 7)),
]


@pytest.mark.parametrize(("r", "n", "optimum"), KNOWN_OPTIMA)
def test_frame_reaches_the_known_optimal_coherence(r: int, n: int, optimum: float) -> None:
    frame = etf_frame(r, n)
    assert frame.matrix.shape == (r, n)
    assert frame.coherence == pytest.approx(coherence(frame.matrix))
    assert frame_defect(frame.matrix, optimum) is None, frame_defect(frame.matrix, optimum)


@pytest.mark.parametrize(("r", "n"), [(3, 6), (5, 10), (7, 28)])
def test_wrong_constructions_fail_the_optimality_check(r: int, n: int) -> None:
    optimum = welch_bound(r, n)
    # a random unit-norm tight frame: tight and unit norm, but far from equiangular
    gen = torch.Generator().manual_seed(0)
    random_tight = make_tight_unit(torch.randn(r, n, generator=gen, dtype=torch.float64))
    assert random_tight is not None
    assert "coherence" in (frame_defect(random_tight, optimum) or "")
    # the optimal frame with one column nudged: no longer tight
    bent = etf_frame(r, n).matrix.clone()
    bent[:, 0] = bent[:, 0] + 1e-3 * bent[:, 1]
    bent[:, 0] /= bent[:, 0].norm()
    assert "not tight" in (frame_defect(bent, optimum) or "")


@pytest.mark.parametrize(("r", "n"), [(4, 5), (4, 20), (8, 36), (5, 40), (16, 200)])
def test_unit_norm_tight_frame_without_a_known_optimum(r: int, n: int) -> None:
    # No optimum is known here: tightness and unit norms hold exactly, coherence is reported.
    frame = etf_frame(r, n)
    assert frame_defect(frame.matrix, frame.coherence) is None


def test_simplex_is_exact_etf() -> None:
    frame = etf_frame(6, 7)
    gram = frame.matrix.T @ frame.matrix
    off = gram[~torch.eye(7, dtype=torch.bool)].abs()
    assert frame.kind == "simplex"
    assert (off - welch_bound(6, 7)).abs().max() < 1e-12  # equiangular at √((n−r)/(r(n−1))) = 1/r
    assert welch_bound(6, 7) == pytest.approx(1 / 6)


def test_known_real_etf_is_found() -> None:
    # 6 equiangular lines in R^3 (icosahedron diagonals) meet the Welch bound 1/√5.
    assert etf_frame(3, 6).coherence == pytest.approx(1 / math.sqrt(5), abs=1e-9)


def test_bounds() -> None:
    assert welch_bound(8, 64) == pytest.approx(math.sqrt(56 / (8 * 63)))
    assert levenstein_bound(8, 36) is None  # Gerzon: n ≤ r(r+1)/2
    assert levenstein_bound(8, 64) == pytest.approx(math.sqrt((192 - 64 - 16) / (10 * 56)))


def test_init_etf_sets_a_and_zero_b() -> None:
    model = nn.Sequential(LoRALinear(nn.Linear(24, 10), r=4, alpha=8))
    frames = init_etf(model)
    layer = model[0]
    assert torch.count_nonzero(layer.lora_B) == 0
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, 6.0 * torch.eye(4), atol=1e-5, rtol=0)
    assert frames["0"].matrix.shape == (4, 24)
