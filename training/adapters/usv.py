"""Rank-adaptive SVD-type adapters: ``W = W0 + s · U S Vᵀ``.

Shapes (``m`` = out_features, ``n`` = in_features, ``R`` = ``r_max``, ``r`` = active rank)::

    W0: [m, n] frozen base weight       U: [m, R]  orthonormal in its first r columns
    S:  [R, R] core (active block r×r)  V: [n, R]  orthonormal in its first r columns
    y = x W0ᵀ + b0 + s · ((x V_r) S_rᵀ) U_rᵀ,   U_r = U[:, :r], S_r = S[:r, :r], V_r = V[:, :r]

The buffers are sized ``r_max`` so that a rank change never reallocates parameters or
optimizer state; only the active block takes part in the forward, and the optimizers keep
everything outside it zero. ``s = alpha`` is a constant independent of the rank, so a
truncation never rescales the adapter (GeoLoRA's fixed-scale rule).

Init: ``U``, ``V`` are random orthonormal (QR of a Gaussian), ``S = 0``: the adapted model
starts exactly equal to the base model, and the geometric optimizers still receive the
first-order information they need (``G V`` and ``Gᵀ U``, see below) although ``S = 0``.

Gradient probes. With ``Z = U S Vᵀ`` and ``G_Z = ∂L/∂Z = s · Σ_tokens g_yᵀ x`` ([m, n], never
formed), the rank-adaptive integrators need ``G_Z V`` ([m, r]) and ``G_Zᵀ U`` ([n, r]).
Autograd only gives ``∂L/∂U = G_Z V Sᵀ`` and ``∂L/∂V = G_Zᵀ U S``, which need ``S⁻¹`` to undo.
The custom backward below computes ``G_Z V`` and ``G_Zᵀ U`` anyway on its way to ``∂L/∂U``,
``∂L/∂V`` and delivers them as the gradients of two zero "probe" leaves — so they cost no
extra matmul over a plain backward, need no inverse, and accumulate over micro-batches like
any gradient. Read them with :meth:`USVLinear.probe_grads`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _USVDelta(torch.autograd.Function):
    """``out = s · ((x V) Sᵀ) Uᵀ`` with probe gradients.

    Semantics (rows are tokens, T = prod of leading dims)::

        x: [..., n]  U: [m, r]  S: [r, r]  V: [n, r]  probe_k: [m, r]  probe_l: [n, r] (zeros)
        out[t] = s · U S Vᵀ x[t]                                   -> [..., m]
        backward, with gy = ∂L/∂out ([T, m]), a = x V ([T, r]), c = gy U ([T, r]):
          ∂L/∂probe_k = s · gyᵀ a = G_Z V       ∂L/∂probe_l = s · xᵀ c = G_Zᵀ U
          ∂L/∂U = (G_Z V) Sᵀ   ∂L/∂V = (G_Zᵀ U) S   ∂L/∂S = Uᵀ (G_Z V)   ∂L/∂x = s · c S Vᵀ
    The probes enter the function as if ``out += s·(xV) probe_kᵀ + s·(x probe_l) Uᵀ``; they
    are always zero, so that term is skipped in the forward but exact in the backward.
    """

    @staticmethod
    def forward(ctx, x, U, S, V, probe_k, probe_l, scale: float):  # type: ignore[override]
        a = x @ V
        ctx.save_for_backward(x, a, U, S, V)
        ctx.scale = scale
        return ((a @ S.mT) @ U.mT) * scale

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, a, U, S, V = ctx.saved_tensors
        s = ctx.scale
        gy2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        a2 = a.reshape(-1, a.shape[-1])
        c = gy2 @ U
        gk = (gy2.mT @ a2) * s
        gl = (x2.mT @ c) * s
        need = ctx.needs_input_grad
        gx = ((c @ S) @ V.mT * s).reshape(x.shape) if need[0] else None
        gU = gk @ S.mT if need[1] else None
        gS = U.mT @ gk if need[2] else None
        gV = gl @ S if need[3] else None
        return gx, gU, gS, gV, (gk if need[4] else None), (gl if need[5] else None), None


class USVLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a rank-adaptive ``s · U S Vᵀ`` adapter (module docstring)."""

    def __init__(self, base: nn.Linear, r0: int = 8, r_min: int = 1, r_max: int = 16, alpha: float = 1.0) -> None:
        super().__init__()
        m, n = base.out_features, base.in_features
        if not 1 <= r_min <= r0 <= r_max:
            raise ValueError(f"need 1 <= r_min <= r0 <= r_max, got r_min={r_min}, r0={r0}, r_max={r_max}")
        if r_max > min(m, n):
            raise ValueError(f"r_max={r_max} exceeds min(out, in)={min(m, n)}; lower r_max for this layer")
        self.base = base
        base.requires_grad_(False)
        self.r_min, self.r_max, self.scale = r_min, r_max, float(alpha)
        # fp32 master weights over a 16-bit base (see LoRALinear)
        dtype, device = torch.promote_types(base.weight.dtype, torch.float32), base.weight.device
        self.U = nn.Parameter(torch.zeros(m, r_max, dtype=dtype, device=device))
        self.S = nn.Parameter(torch.zeros(r_max, r_max, dtype=dtype, device=device))
        self.V = nn.Parameter(torch.zeros(n, r_max, dtype=dtype, device=device))
        # The active rank lives in a buffer so that it is saved with the weights; `rank`
        # mirrors it as a Python int to keep the forward free of host syncs.
        self.register_buffer("active_rank", torch.tensor(r0, dtype=torch.int64))
        self.rank = r0
        self.register_load_state_dict_post_hook(_sync_rank_after_load)
        self._probe_k: torch.Tensor | None = None
        self._probe_l: torch.Tensor | None = None
        self._substitute: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.reset_adapter(r0)

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @torch.no_grad()
    def reset_adapter(self, r0: int) -> None:
        """Random orthonormal ``U``, ``V`` (QR of a Gaussian), ``S = 0``: output equals the base."""
        m, n = self.out_features, self.in_features
        work = torch.float64 if self.U.dtype == torch.float64 else torch.float32
        qu = torch.linalg.qr(torch.randn(m, r0, dtype=work, device=self.U.device)).Q
        qv = torch.linalg.qr(torch.randn(n, r0, dtype=work, device=self.V.device)).Q
        self.U.zero_()
        self.V.zero_()
        self.S.zero_()
        self.U[:, :r0] = qu.to(self.U.dtype)
        self.V[:, :r0] = qv.to(self.V.dtype)
        self.set_rank(r0)

    def set_rank(self, r: int) -> None:
        """Set the active rank (the caller has written the factors' first ``r`` columns)."""
        if not self.r_min <= r <= self.r_max:
            raise ValueError(f"rank {r} outside [r_min, r_max] = [{self.r_min}, {self.r_max}]")
        self.rank = int(r)
        self.active_rank.fill_(r)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Active views ``(U_r [m, r], S_r [r, r], V_r [n, r])``; gradients flow into the parameters."""
        r = self.rank
        return self.U[:, :r], self.S[:r, :r], self.V[:, :r]

    def delta_weight(self) -> torch.Tensor:
        """``s · U_r S_r V_rᵀ`` as a dense [m, n] tensor (for tests and merging)."""
        U, S, V = self.factors()
        return self.scale * (U @ S @ V.mT)

    def _probes(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Zero leaves whose .grad receives G_Z V and G_Zᵀ U; re-created if the module moved.
        ref = self.U
        if self._probe_k is None or self._probe_k.device != ref.device or self._probe_k.dtype != ref.dtype:
            kw = dict(dtype=ref.dtype, device=ref.device, requires_grad=True)
            self._probe_k = torch.zeros(self.out_features, self.r_max, **kw)
            self._probe_l = torch.zeros(self.in_features, self.r_max, **kw)
        assert self._probe_l is not None
        return self._probe_k, self._probe_l

    def probe_leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two probe leaves themselves (created if missing), e.g. to all-reduce their gradients."""
        return self._probes()

    def probe_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(G_Z V [m, r], G_Zᵀ U [n, r])`` accumulated since the last :meth:`clear_probe_grads`."""
        pk, pl = self._probe_k, self._probe_l
        if pk is None or pl is None or pk.grad is None or pl.grad is None:
            return None
        r = self.rank
        return pk.grad[:, :r], pl.grad[:, :r]

    def clear_probe_grads(self) -> None:
        for p in (self._probe_k, self._probe_l):
            if p is not None:
                p.grad = None

    @contextlib.contextmanager
    def substituted(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> Iterator[None]:
        """Run the forward with ``s · U S Vᵀ`` (any width) in place of the stored factors.

        Used by DLRT's second pass: the same W written over the augmented bases, with ``S``
        a fresh leaf whose gradient is ``Uᵀ G_Z V``.
        """
        self._substitute = (U, S, V)
        try:
            yield
        finally:
            self._substitute = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        xa = x.to(self.U.dtype)
        if self._substitute is not None:
            U, S, V = self._substitute
            delta = ((xa @ V) @ S.mT) @ U.mT * self.scale
        else:
            U, S, V = self.factors()
            pk, pl = self._probes()
            r = self.rank
            delta = _USVDelta.apply(xa, U, S, V, pk[:, :r], pl[:, :r], self.scale)
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"r_min={self.r_min}, r_max={self.r_max}, scale={self.scale}"
        )


def _sync_rank_after_load(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, USVLinear)
    module.rank = int(module.active_rank.item())


class USVTriple(NamedTuple):
    """One adapted layer: active views of its factors and the module that owns them."""

    name: str
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    module: USVLinear


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_usv(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    r0: int = 8,
    r_min: int = 1,
    r_max: int = 16,
    alpha: float = 1.0,
) -> dict[str, USVLinear]:
    """Replace every ``nn.Linear`` whose last name component is in ``targets`` by a ``USVLinear``.

    Like PEFT, every pre-existing parameter of ``model`` is frozen; only ``U``, ``S``, ``V``
    train. Per layer ``r_max`` is lowered to ``min(m, n)`` if needed (``r0`` with it).
    Returns ``{module name: USVLinear}`` in ``named_modules`` order.
    """
    model.requires_grad_(False)
    wanted = set(targets)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in wanted
    ]
    if not found:
        raise ValueError(f"no nn.Linear named any of {sorted(wanted)} in the model; check `targets`")
    out: dict[str, USVLinear] = {}
    for name, lin in found:
        cap = min(lin.out_features, lin.in_features, r_max)
        layer = USVLinear(lin, r0=min(r0, cap), r_min=min(r_min, cap), r_max=cap, alpha=alpha)
        _set_submodule(model, name, layer)
        out[name] = layer
    logger.info("injected %d USV adapters (r0=%d, r_max=%d, alpha=%g)", len(out), r0, r_max, alpha)
    return out


def usv_modules(model: nn.Module) -> dict[str, USVLinear]:
    """``{name: USVLinear}`` found by walking the modules (not the parameter order)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, USVLinear)}


def usv_triples(model: nn.Module) -> list[USVTriple]:
    """``[(name, U_r, S_r, V_r, module)]`` for every USV adapter, collected by module."""
    triples = [USVTriple(name, *mod.factors(), mod) for name, mod in usv_modules(model).items()]
    if not triples:
        raise ValueError("model has no USVLinear modules; call inject_usv(model, ...) first")
    return triples
