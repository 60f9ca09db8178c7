"""Subject-conditioned multi-adapter linear (optimizers.md §11, Klein et al.) and its injection.

Semantics, one row ``i`` of ``x: [N, n]`` with subject ``s(i)`` (``-1`` = no subject)::

    y[i] = x[i] @ W_genᵀ (+ bias) + scale · (x[i] @ A_sᵀ) @ B_sᵀ     if s(i) >= 0
    y[i] = x[i] @ W_genᵀ (+ bias)                                    otherwise

``W_gen: [m, n]`` is the base ``nn.Linear`` (frozen by default, as for a pre-trained base;
``train_base=True`` makes it trainable), ``A_s: [r, n] ~ N(0, σ²)``, ``B_s: [m, r] = 0``.
(§11 writes ``A_s ∈ R^{n×r}``, ``B_s ∈ R^{r×m}``; we store the PEFT orientation, so
``lora_A = A_s`` and ``lora_B = B_s`` on export.)

Design choices:

- Each subject's ``(A_s, B_s)`` lives in its own child module :class:`SubjectAdapter` with
  ``lora_A``, ``lora_B`` and ``scaling`` — exactly what ``adapters.lora.lora_pairs`` looks
  for, so every pair optimizer of the registry sees one :class:`LoRAPair` per (layer,
  subject) and batches the r×r algebra of all subjects of equal shape in one linalg call.
- Pools are built per forward with ``torch.cat`` from the subjects *present in the batch*
  only (a few KB per layer, negligible next to the matmuls). Absent subjects are then not in
  the autograd graph at all: their ``.grad`` stays ``None`` after ``backward`` (with
  ``zero_grad(set_to_none=True)``), and AdamW and our pair optimizers skip parameters whose
  grad is ``None`` — no momentum drift, no weight decay, no step count. A persistent pool
  parameter with per-subject views would instead give absent subjects zero gradients,
  which AdamW would still decay and move by its momentum.
- The per-row path is the server's: ``kernels.ops.shrink`` / ``expand`` with
  ``build_lora_meta`` (under autograd they run the differentiable reference).
- Per-forward routing travels in a context variable set by :func:`subject_batch` (reset
  even when the forward raises): a transformers forward cannot carry extra arguments down
  to its linears. A layer may see ``N = B · k`` rows (e.g.
  ``k`` tokens per sequence); each sample's subject is repeated over its ``k`` rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafold.kernels.meta import LoRABatchMeta, build_lora_meta
from lorafold.kernels.ops import expand, shrink
from lorafold.training.adapters.lora import DEFAULT_TARGETS, LoRAPair, lora_scale

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SubjectBatch:
    """Routing of one forward: ``sample_subjects [B]`` int64 (``-1`` = base only).

    ``present`` lists the subject indices that occur (ascending); a subject's slot in the
    per-forward pools is its position in ``present``. Metadata is built once per row count
    and shared by every layer that sees that many rows.
    """

    sample_subjects: torch.Tensor
    present: list[int]
    _slot_of: torch.Tensor  # [num_subjects + 1] subject index -> pool slot (last entry: -1 -> -1)
    _metas: dict[tuple, LoRABatchMeta] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.sample_subjects.numel())

    def meta_for(self, num_rows: int, rank: int, device: torch.device) -> tuple[LoRABatchMeta, torch.Tensor, torch.Tensor]:
        """``(meta, row_start, ranks)`` for a layer that sees ``num_rows`` rows of rank ``rank``."""
        if num_rows % self.num_samples:
            raise ValueError(f"layer input has {num_rows} rows, not a multiple of the batch's {self.num_samples} samples")
        k = len(self.present)
        row_start = torch.arange(k, dtype=torch.int64, device=device) * rank
        alloc = torch.full((k,), rank, dtype=torch.int64, device=device)
        key = (num_rows, rank, str(device))
        if key not in self._metas:
            slots = self._slot_of[self.sample_subjects].repeat_interleave(num_rows // self.num_samples)
            self._metas[key] = build_lora_meta(slots.to(device), row_start, alloc)
        return self._metas[key], row_start, alloc.to(torch.int32)[None]


_CURRENT: contextvars.ContextVar[SubjectBatch | None] = contextvars.ContextVar("lorafold_subject_batch", default=None)


def make_subject_batch(sample_subjects: torch.Tensor, num_subjects: int) -> SubjectBatch:
    """Build the routing for ``sample_subjects [B]`` (values in ``[-1, num_subjects)``)."""
    subj = sample_subjects.to(torch.int64).flatten()
    if subj.numel() and (int(subj.min()) < -1 or int(subj.max()) >= num_subjects):
        raise ValueError(f"subject ids must be in [-1, {num_subjects}); got {subj.tolist()}")
    present = sorted(set(subj.tolist()) - {-1})  # host sync: once per forward
    slot_of = torch.full((num_subjects + 1,), -1, dtype=torch.int64)
    slot_of[torch.tensor(present, dtype=torch.int64)] = torch.arange(len(present))
    return SubjectBatch(subj.cpu(), present, slot_of)


@contextlib.contextmanager
def subject_batch(sample_subjects: torch.Tensor, num_subjects: int) -> Iterator[SubjectBatch]:
    """Route every :class:`SubjectLoRALinear` inside the block by ``sample_subjects [B]``."""
    token = _CURRENT.set(make_subject_batch(sample_subjects, num_subjects))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


class SubjectAdapter(nn.Module):
    """One subject's factors: ``ΔW_s = scaling · lora_B @ lora_A`` (a LoRA pair for optimizers)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, sigma: float,
                 dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.randn(r, in_features, dtype=dtype, device=device) * sigma)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))


class SubjectLoRALinear(nn.Module):
    """``base`` plus one low-rank adapter per subject, routed per row (see module docstring)."""

    def __init__(self, base: nn.Linear, subjects: Sequence[str], r: int, alpha: float, *,
                 sigma: float | None = None, rslora: bool = False, train_base: bool = False) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"rank r must be positive, got {r}")
        if not subjects:
            raise ValueError("need at least one subject")
        self.base = base
        base.weight.requires_grad_(train_base)
        if base.bias is not None:
            base.bias.requires_grad_(train_base)
        self.subjects = list(subjects)
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = lora_scale(r, alpha, rslora)
        sigma = 1.0 / math.sqrt(base.in_features) if sigma is None else sigma
        w = base.weight
        self.adapters = nn.ModuleDict({
            s: SubjectAdapter(base.in_features, base.out_features, r, self.scaling, sigma, w.dtype, w.device)
            for s in self.subjects
        })

    def _factors(self, present: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_pool [1, k·r, n]`` and ``b_pool [k·r, m]`` (scale folded in) of the present subjects."""
        mods = [self.adapters[self.subjects[i]] for i in present]
        a_pool = torch.cat([m.lora_A for m in mods])[None]
        b_pool = torch.cat([m.lora_B.T for m in mods]) * self.scaling
        return a_pool, b_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = _CURRENT.get()
        if batch is None or not batch.present:
            return out  # no routing (or no subject rows): the base model
        lead = x.shape[:-1]
        x2, out2 = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        meta, row_start, ranks = batch.meta_for(x2.shape[0], self.r, x.device)
        a_pool, b_pool = self._factors(batch.present)
        y = shrink(x2.to(a_pool.dtype), a_pool, row_start, ranks, meta)  # [1, N, r] fp32
        # expand adds into out2 in place (autograd-safe: linear's backward does not read its output)
        expand(y.to(b_pool.dtype), b_pool, row_start, ranks, [0, out2.shape[-1]], meta, out2)
        return out2.reshape(*lead, out2.shape[-1])

    def merged_weight(self, subject: str) -> torch.Tensor:
        """``W_gen + scale · B_s A_s``: [m, n]."""
        ad = self.adapters[subject]
        return self.base.weight + self.scaling * (ad.lora_B @ ad.lora_A)

    def extra_repr(self) -> str:
        return f"subjects={len(self.subjects)}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def inject_subject_lora(
    model: nn.Module,
    subjects: Sequence[str],
    targets: Iterable[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16,
    *,
    sigma: float | None = None,
    rslora: bool = False,
    train_base: bool = False,
) -> dict[str, SubjectLoRALinear]:
    """Replace every ``nn.Linear`` whose last name component is in ``targets``.

    All other parameters of ``model`` are frozen. Subject names become module names, so they
    must not contain dots. Returns ``{module name: SubjectLoRALinear}``.
    """
    bad = [s for s in subjects if "." in s or not s]
    if bad or len(set(subjects)) != len(subjects):
        raise ValueError(f"subject names must be unique, non-empty and dot-free; got {list(subjects)}")
    targets = set(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named one of {sorted(targets)} in the model; check the module names")
    injected: dict[str, SubjectLoRALinear] = {}
    for name, linear in found:
        layer = SubjectLoRALinear(linear, subjects, r, alpha, sigma=sigma, rslora=rslora, train_base=train_base)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        injected[name] = layer
    logger.info("injected %d subject adapters into %d modules (r=%d)", len(subjects), len(injected), r)
    return injected


def subject_layers(model: nn.Module) -> dict[str, SubjectLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SubjectLoRALinear)}


def subject_pairs(model: nn.Module, subjects: Iterable[str] | None = None) -> list[LoRAPair]:
    """One :class:`LoRAPair` per (layer, subject), named ``<layer>.<subject>``, found by module."""
    pairs = []
    for name, layer in subject_layers(model).items():
        for s in layer.subjects if subjects is None else subjects:
            ad = layer.adapters[s]
            pairs.append(LoRAPair(f"{name}.{s}", ad.lora_A, ad.lora_B, ad.scaling))
    return pairs


def subject_params(model: nn.Module, subject: str) -> list[nn.Parameter]:
    return [t for p in subject_pairs(model, [subject]) for t in (p.A, p.B)]
