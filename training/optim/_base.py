"""``PairOptimizer``: a ``torch.optim.Optimizer`` that knows which tensors form a LoRA pair.

Parameter groups (both plain torch groups, so ``state_dict`` / ``load_state_dict`` work):

- the *paired* group: ``params = [A_0, B_0, A_1, B_1, ...]`` built from explicit
  :class:`LoRAPair` objects (found by module, never inferred from parameter order), with
  ``names`` and ``scales`` lists aligned to the pairs;
- an optional *plain* group for trainable parameters that belong to no pair: they get the
  method's base update (Adam or SGD) without preconditioning.

A pair whose ``A.grad`` or ``B.grad`` is ``None`` (e.g. a subject absent from the batch)
is skipped entirely: no momentum drift, no weight decay, no step count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRAPair
from lorafold.training.optim._common import adamw_fused, sgd_foreach


@dataclass(slots=True)
class ActivePair:
    """One pair with gradients, as the step sees it (``A: [r, n]``, ``B: [m, r]``)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    gA: torch.Tensor
    gB: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class PairOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement ``_step_pairs(group, pairs)``."""

    def __init__(
        self,
        pairs: Sequence[LoRAPair],
        defaults: dict[str, Any],
        extra_params: Iterable[nn.Parameter] = (),
    ) -> None:
        pairs = list(pairs)
        if not pairs:
            raise ValueError("no LoRA pairs given; build with pairs=lora_pairs(model) after inject_lora(model)")
        seen: set[int] = set()
        for pair in pairs:
            for p in (pair.A, pair.B):
                if id(p) in seen:
                    raise ValueError(f"parameter of pair {pair.name!r} appears in two pairs")
                seen.add(id(p))
        groups: list[dict[str, Any]] = [
            {
                "params": [p for pair in pairs for p in (pair.A, pair.B)],
                "names": [pair.name for pair in pairs],
                "scales": [float(pair.scale) for pair in pairs],
                "paired": True,
            }
        ]
        extra = [p for p in extra_params if id(p) not in seen]
        if extra:
            groups.append({"params": extra, "names": [], "scales": [], "paired": False})
        super().__init__(groups, defaults)

    @staticmethod
    def active_pairs(group: dict[str, Any]) -> list[ActivePair]:
        params = group["params"]
        out = []
        for i, (name, scale) in enumerate(zip(group["names"], group["scales"], strict=True)):
            a, b = params[2 * i], params[2 * i + 1]
            if a.grad is None or b.grad is None:
                continue
            out.append(ActivePair(name, a, b, scale, a.grad, b.grad))
        return out

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["paired"]:
                pairs = self.active_pairs(group)
                if pairs:
                    self._step_pairs(group, pairs)
            else:
                self._step_plain(group)
        return loss

    def _step_pairs(self, group: dict[str, Any], pairs: list[ActivePair]) -> None:
        raise NotImplementedError

    # ----- shared base updates -------------------------------------------------------------

    def _adam_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def adam_update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """AdamW on ``params`` with the (preconditioned) ``grads``; per-parameter step counts."""
        states = [self._adam_state(p) for p in params]
        for s in states:
            s["step"] += 1
        adamw_fused(
            params,
            [g.to(p.dtype) for p, g in zip(params, grads, strict=True)],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
        )

    def sgd_update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        sgd_foreach(params, [g.to(p.dtype) for p, g in zip(params, grads, strict=True)], group["lr"], group["weight_decay"])

    def _step_plain(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if "betas" in group:
            self.adam_update(group, params, grads)
        else:
            self.sgd_update(group, params, grads)


def flatten_pairs(
    pairs: Sequence[ActivePair], ga: Sequence[torch.Tensor], gb: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``[A_0, B_0, ...]`` and the matching gradient list ``[ĝA_0, ĝB_0, ...]``."""
    params = [t for p in pairs for t in (p.A, p.B)]
    grads = [t for pair in zip(ga, gb, strict=True) for t in pair]
    return params, grads


def shape_buckets(pairs: Sequence[ActivePair]) -> dict[tuple, list[int]]:
    """Indices of pairs with identical ``(A, B)`` shapes and dtype: they stack into one batch."""
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        buckets.setdefault((tuple(p.A.shape), tuple(p.B.shape), p.A.dtype, p.A.device), []).append(i)
    return buckets


def stack_bucket(
    pairs: Sequence[ActivePair], idx: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A [k, r, n], B [k, m, r], g_A [k, r, n], g_B [k, m, r])`` for the pairs in ``idx``.

    One copy of the factors and gradients per step; in exchange every per-layer op below
    becomes one batched op per shape (7 shapes instead of 210 layers on a Llama)."""
    sub = [pairs[i] for i in idx]
    return (
        torch.stack([p.A for p in sub]),
        torch.stack([p.B for p in sub]),
        torch.stack([p.gA for p in sub]),
        torch.stack([p.gB for p in sub]),
    )


def rank_batches(
    pairs: Sequence[ActivePair],
) -> list[list[tuple[list[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]]:
    """Shape buckets (with their stacked tensors) grouped by rank: the r×r matrices of all
    buckets of one rank concatenate into one ``[k_total, r, r]`` batch for a single linalg call."""
    by_rank: dict[int, list] = {}
    for idx in shape_buckets(pairs).values():
        by_rank.setdefault(pairs[idx[0]].rank, []).append((idx, stack_bucket(pairs, idx)))
    return list(by_rank.values())
