"""ETF init (spec §9): exact tightness and unit norms; coherence vs Welch / Levenstein."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear
from lorafold.training.init.etf import coherence, etf_frame, init_etf, levenstein_bound, welch_bound
from lorafold.training.optim.testbed import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize(("r", "n"), [(4, 4), (4, 5), (8, 9), (3, 6), (4, 20), (8, 36), (5, 40), (16, 200)])
def test_unit_norm_tight_frame(r: int, n: int) -> None:
    frame = etf_frame(r, n)
    a = frame.matrix
    assert a.shape == (r, n)
    assert (a @ a.T - (n / r) * torch.eye(r, dtype=torch.float64)).norm() < 1e-10
    assert (a.norm(dim=0) - 1).abs().max() < 1e-12
    assert frame.coherence == pytest.approx(coherence(a))
    assert frame.coherence >= frame.welch_bound - 1e-12  # nothing beats the Welch bound
    if frame.levenstein_bound is not None:
        assert frame.coherence >= frame.levenstein_bound - 1e-12


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
