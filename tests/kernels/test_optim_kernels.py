"""The compiled AdaPreLoRA passes (`kernels/csrc/optim_ops.cpp`) against float64 references.

Shapes cover what the kernels tile differently: ranks that are and are not multiples of 8
(rows read in place vs through the padded copy), row counts with and without a tail after
the whole 24-row groups, column counts that are not multiples of the 16-column blocks, and
one layer so small that every tile is padding.
"""

from __future__ import annotations

import pytest
import torch

from lorafold.kernels import cpu_ops
from tests.conftest import require_cpu_kernels

D = torch.float64
SHAPES = [(576, 576), (192, 576), (1536, 576), (33, 129), (7, 5), (1, 1), (250, 17), (48, 40)]
RANKS = [1, 3, 8, 12, 16, 24, 40]


@pytest.fixture(autouse=True, scope="module")
def _kernels() -> None:
    require_cpu_kernels()


def _layers(r: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + r)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    a = [rnd(r, n) for _, n in SHAPES]
    b = [rnd(m, r) for m, _ in SHAPES]
    g_a = [rnd(r, n) for _, n in SHAPES]
    g_b = [rnd(m, r) for m, _ in SHAPES]
    return a, b, g_a, g_b, gen


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(D) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("r", RANKS)
def test_grams_match_float64(r: int) -> None:
    a, b, g_a, g_b, _ = _layers(r)
    gm, gn = cpu_ops.adapre_grams(a, b, g_a, g_b, True)
    gm_skip, gn_skip = cpu_ops.adapre_grams(a, b, g_a, g_b, False)
    assert gm.shape == gn.shape == (len(SHAPES), 2 * r, 2 * r)
    for i in range(len(SHAPES)):
        w = torch.cat([b[i], g_b[i]], 1).to(D)
        x = torch.cat([g_a[i], a[i]], 0).to(D)
        assert _rel(gm[i], w.T @ w) < 1e-5
        assert _rel(gn[i], x @ x.T) < 1e-5
        # without the statistic only g_A Aᵀ (and its transpose) is computed
        ga_a = g_a[i].to(D) @ a[i].to(D).T
        assert _rel(gn_skip[i][:r, r:], ga_a) < 1e-5 and _rel(gn_skip[i][r:, :r], ga_a.T) < 1e-5


@pytest.mark.parametrize("r", RANKS)
def test_weights_fold_and_weighted_grams_match_float64(r: int) -> None:
    a, b, g_a, g_b, gen = _layers(r, seed=1)
    k = len(SHAPES)
    # PSD like the real kernels (sums of squares), not symmetric: the kernel symmetrizes
    eye = torch.eye(2 * r)
    k_row, k_col = (x @ x.mT + eye + 0.05 * torch.randn(k, 2 * r, 2 * r, generator=gen) for x in
                    (torch.randn(k, 2 * r, 2 * r, generator=gen), torch.randn(k, 2 * r, 2 * r, generator=gen)))
    rows0 = [torch.rand(m, generator=gen) for m, _ in SHAPES]
    cols0 = [torch.rand(n, generator=gen) for _, n in SHAPES]
    inv_corr = [1.0 / (1.0 - 0.999 ** (i + 1)) for i in range(k)]
    fold = [0.25 + 0.05 * i for i in range(k)]
    rows, cols = [t.clone() for t in rows0], [t.clone() for t in cols0]
    ell, rho, bl, ar, means = cpu_ops.adapre_weights(a, b, g_a, g_b, rows, cols, inv_corr, 1e-30, k_row, k_col, fold)
    for i in range(k):
        w = torch.cat([b[i], g_b[i]], 1).to(D)
        x = torch.cat([g_a[i], a[i]], 0).to(D)
        row_sq = ((w @ k_row[i].to(D)) * w).sum(1)  # the quadratic forms
        col_sq = ((k_col[i].to(D) @ x) * x).sum(0)
        r_t = rows0[i].to(D) + fold[i] * (row_sq - rows0[i].to(D))
        c_t = cols0[i].to(D) + fold[i] * (col_sq - cols0[i].to(D))
        assert _rel(rows[i], r_t) < 1e-5 and _rel(cols[i], c_t) < 1e-5, "state folded in place"
        r_hat, c_hat = r_t * inv_corr[i] + 1e-30, c_t * inv_corr[i] + 1e-30
        e_ref, rho_ref = r_hat.sqrt(), c_hat.sqrt() / r_hat.sum().sqrt()
        assert _rel(ell[i], e_ref) < 1e-5 and _rel(rho[i], rho_ref) < 1e-5
        bd, ad = b[i].to(D), a[i].to(D)
        assert _rel(bl[i], bd.T @ (e_ref[:, None] * bd)) < 1e-5
        assert _rel(ar[i], (ad * rho_ref) @ ad.T) < 1e-5
        assert abs(means[i, 0] - e_ref.mean()) < 1e-5 * e_ref.mean()
        assert abs(means[i, 1] - rho_ref.mean()) < 1e-5 * rho_ref.mean()


def test_weights_without_the_statistic_leave_the_state_alone() -> None:
    a, b, g_a, g_b, gen = _layers(16, seed=2)
    rows = [torch.rand(m, generator=gen) for m, _ in SHAPES]
    cols = [torch.rand(n, generator=gen) for _, n in SHAPES]
    before = [t.clone() for t in rows + cols]
    ell, _, _, _, _ = cpu_ops.adapre_weights(a, b, g_a, g_b, rows, cols, [1.0] * len(SHAPES), 1e-30)
    assert all(torch.equal(x, y) for x, y in zip(rows + cols, before, strict=True))
    assert torch.allclose(ell[0], (rows[0] + 1e-30).sqrt())


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("r", RANKS)
def test_update_matches_float64(r: int, momentum: bool) -> None:
    a, b, g_a, g_b, gen = _layers(r, seed=3)
    k = len(SHAPES)
    ell = [torch.rand(m, generator=gen) + 0.5 for m, _ in SHAPES]
    rho = [torch.rand(n, generator=gen) + 0.5 for _, n in SHAPES]
    left, right, half_c = (torch.randn(k, r, r, generator=gen) for _ in range(3))
    mom_a = [torch.randn_like(t) for t in a] if momentum else None
    mom_b = [torch.randn_like(t) for t in b] if momentum else None
    refs = []
    for i in range(k):
        ad, bd, gad, gbd = (t[i].to(D) for t in (a, b, g_a, g_b))
        d_a = (left[i].to(D) @ gad) / rho[i].to(D) + half_c[i].to(D) @ ad
        d_b = (gbd @ right[i].to(D)) / ell[i].to(D)[:, None] + bd @ half_c[i].to(D)
        if momentum:
            d_a = mom_a[i].to(D) + 0.2 * (d_a - mom_a[i].to(D))
            d_b = mom_b[i].to(D) + 0.2 * (d_b - mom_b[i].to(D))
        refs.append(((ad + 0.3 * d_a) * 0.9, (bd + 0.3 * d_b) * 0.9, d_a, d_b))
    cpu_ops.adapre_update(a, b, g_a, g_b, ell, rho, left, right, half_c, 0.3, 0.9, mom_a, mom_b, 0.8)
    for i, (a_ref, b_ref, m_a, m_b) in enumerate(refs):
        assert _rel(a[i], a_ref) < 1e-5 and _rel(b[i], b_ref) < 1e-5
        if momentum:
            assert _rel(mom_a[i], m_a) < 1e-5 and _rel(mom_b[i], m_b) < 1e-5


def test_cholesky_inverse_matches_lapack_and_flags_failures() -> None:
    gen = torch.Generator().manual_seed(4)
    for r in (1, 2, 5, 16, 33):
        x = torch.randn(40, r, r + 3, generator=gen, dtype=D)
        mats = x @ x.mT + 1e-3 * torch.eye(r, dtype=D)
        mats[3] = -torch.eye(r, dtype=D)  # not positive definite
        mats[7, r - 1, 0] = float("nan")  # not finite (lower triangle, the one that is read)
        inv, ok = cpu_ops.spd_cholesky_inverse(mats)
        good = torch.ones(40, dtype=torch.bool)
        good[3] = good[7] = False
        assert torch.equal(ok, good)
        ref = torch.cholesky_inverse(torch.linalg.cholesky(mats[good]))
        assert ((inv[good] - ref).abs().amax((1, 2)) / ref.abs().amax((1, 2))).max() < 1e-10
        assert torch.equal(inv[3], torch.eye(r, dtype=D)) and torch.equal(inv[7], torch.eye(r, dtype=D))


def test_bad_input_is_refused_with_a_message() -> None:
    a, b, g_a, g_b, _ = _layers(8)
    with pytest.raises(RuntimeError, match="one rank per call"):
        cpu_ops.adapre_grams([a[0], torch.zeros(4, 5)], b[:2], g_a[:2], g_b[:2], True)
    with pytest.raises(RuntimeError, match="gB must have B's shape"):
        cpu_ops.adapre_grams(a[:1], b[:1], g_a[:1], [g_b[1]], True)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_ops.adapre_grams([a[0].double()], b[:1], g_a[:1], g_b[:1], True)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_ops.adapre_grams([a[0].T.contiguous().T], b[:1], g_a[:1], g_b[:1], True)
    rows = [torch.zeros(m) for m, _ in SHAPES]
    cols = [torch.zeros(n) for _, n in SHAPES]
    with pytest.raises(RuntimeError, match="row_state must be"):
        cpu_ops.adapre_weights(a, b, g_a, g_b, cols, cols, [1.0] * len(SHAPES), 1e-30)
    with pytest.raises(RuntimeError, match="both be given"):
        k_row = torch.zeros(len(SHAPES), 16, 16)
        torch.ops.lorafold_cpu.adapre_weights(a, b, g_a, g_b, rows, cols, [1.0] * len(SHAPES), 1e-30, k_row, None, [])
    with pytest.raises(RuntimeError, match="must be a contiguous float64"):
        cpu_ops.spd_cholesky_inverse(torch.eye(3)[None])
