"""Data-parallel helpers for ``torchrun`` (or ``torch.multiprocessing.spawn``) training.

- :func:`init_from_env` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (+ ``MASTER_ADDR``,
  ``MASTER_PORT``) and initialises the process group: ``gloo`` on CPU, ``nccl`` on GPU.
  Without ``WORLD_SIZE`` (or with 1) it returns a single-process context and every helper
  here is a no-op, so the same training loop runs with and without ``torchrun``.
- Gradients are all-reduced by hand, not with DDP: subjects absent from a batch must keep
  ``grad = None`` (no momentum drift, no weight decay). :func:`all_reduce_grads` sums the
  grads of every parameter that *some* rank touched (a rank that did not touch it
  contributes zeros) and leaves ``None`` where no rank did. One flat buffer per call, so one
  collective per step, plus one small collective for the "who has a grad" flags.
- Sharding is deterministic: every rank draws the same global batch (same seed) and keeps
  ``batch[rank::world]``; normalise the loss by the *global* label count so the summed
  gradient equals the one-process gradient of the same global batch.
- Writes (checkpoints, exports, logs) happen on rank 0 only: :meth:`DistContext.is_main`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str | None = None, timeout_s: float = 120.0) -> DistContext:
    """Initialise from torchrun's environment; single-process context when ``WORLD_SIZE`` <= 1.

    ``device``: "cpu" or "cuda" (default: cuda if available). The backend follows the device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(device=dev)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistContext(rank, world, local, dev, backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of a global batch: ``items[rank::world]`` (deterministic, disjoint)."""
    return list(items[ctx.rank :: ctx.world_size])


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over ranks, in place; returns ``t``."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_params(params: Sequence[torch.Tensor], ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s values into every rank (identical init whatever each rank's RNG did)."""
    if not ctx.enabled or not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src=src)
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


@torch.no_grad()
def all_reduce_grads(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Sum gradients over ranks; ``None`` stays ``None`` only where *every* rank had ``None``.

    The caller normalises the loss globally (sum over the global batch / global count), so a
    sum — not a mean — reproduces the one-process gradient.
    """
    if not ctx.enabled or not params:
        return
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    live = [p for p, f in zip(params, flags.tolist()) if f]  # host sync: one small vector per step
    if not live:
        return
    dtype = torch.float32
    for p in live:  # at least fp32; fp64 parameters keep fp64
        dtype = torch.promote_types(dtype, p.dtype)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in live])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in live:
        g = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
