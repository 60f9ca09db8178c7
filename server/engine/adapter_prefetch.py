"""Stage the waiting queue's adapters on a worker thread, so their loads are plain copies.

A load has two halves: laying the adapter's factors out as the pools hold them (per module:
fold the scale into B, transpose it, pad to the slot's rows; `AdapterSlots.stage`) and
copying the result into the slot (one copy per pool; `AdapterSlots.fill`). The first half
needs nothing from the step, so it runs here, on one worker, for the adapters that waiting
requests will need; the engine's step then only copies. On a GPU the staged blocks sit in
page-locked host memory and the copies are asynchronous. A load that finds nothing staged
gets the adapter itself, which `AdapterSlots.fill` lays out straight into the slot on CPU
(one pass instead of staging + copying) and stages first elsewhere.

Bounded: at most `max_staged` adapters are staged or in flight at once (each holds its
rows' bytes on the host); staging the rest waits until those are loaded or dropped.

Only where the worker has a core of its own (`prefetch_pays`): on a CPU whose cores all run
the forward's threads, staging on a worker takes cycles from the forward, and costs more in
all than laying the adapter out straight into its slot (staging writes a host block, the load
copies it again), so there the engine loads inline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lorafold.server.lora.peft_format import LoRAAdapter
from lorafold.server.lora.slots import StagedAdapter

logger = logging.getLogger(__name__)


def prefetch_pays(mode: str, device: torch.device) -> bool:
    """Whether to stage ahead on a worker (EngineConfig.adapter_prefetch): "on" / "off" as
    set; "auto": on a GPU (the host's cores are free while the GPU computes, and staged blocks
    in page-locked memory copy asynchronously), on a CPU only when it has more cores than the
    forward's threads."""
    if mode != "auto":
        return mode == "on"
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


@dataclass(slots=True)
class PrefetchStats:
    staged_ahead: int = 0  # loads that found their adapter staged (or staging) already
    unstaged: int = 0  # loads that found nothing staged


class AdapterPrefetcher:
    def __init__(self, stage: Callable[[LoRAAdapter], StagedAdapter], *, max_staged: int = 8) -> None:
        if max_staged < 0:
            raise ValueError(f"max_staged must be >= 0, got {max_staged}")
        self._stage = stage
        self.max_staged = max_staged
        self._pending: dict[str, Future[StagedAdapter]] = {}  # key -> staging (or staged) copy
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-stage") if max_staged else None
        self.stats = PrefetchStats()

    def prefetch(self, wanted: Iterable[tuple[str, LoRAAdapter]]) -> None:
        """Start staging these adapters (in this order) while there is room."""
        if self._pool is None:
            return
        for key, adapter in wanted:
            if len(self._pending) >= self.max_staged:
                return
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._stage, adapter)

    def take(self, key: str, adapter: LoRAAdapter) -> StagedAdapter | LoRAAdapter:
        """What to load: the staged copy of `adapter` when it was prefetched (waiting for it if
        still in flight; its error, if staging failed, is raised here), else `adapter`."""
        future = self._pending.pop(key, None)
        if future is not None:
            self.stats.staged_ahead += 1
            return future.result()  # may block: the worker is mid-way through this adapter
        self.stats.unstaged += 1
        return adapter

    def discard(self, key: str) -> None:
        """Drop a staged copy no request needs any more."""
        future = self._pending.pop(key, None)
        if future is not None:
            future.cancel()

    @property
    def enabled(self) -> bool:
        """Whether this prefetcher stages anything (max_staged > 0)."""
        return self._pool is not None

    @property
    def num_staged(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()
