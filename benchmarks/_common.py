"""Shared benchmark helpers: timing, machine rates for roofline bounds, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timeit(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `fn` over `reps` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(jobs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall time of every job, timed in interleaved rounds (each job once per round,
    after one untimed warm-up round). Machine-speed drift on a shared VM then hits every job
    alike, so the ratios between jobs are stable even when absolute times wander."""
    for fn in jobs.values():
        fn()
    times: dict[str, list[float]] = {label: [] for label in jobs}
    for _ in range(rounds):
        for label, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) for label, t in times.items()}


def machine_rates() -> dict[str, float]:
    """Measured read bandwidth (bytes/s) and fp32 matmul rate (FLOP/s) of this machine.

    The bandwidth is memory's, not cache's: the buffer summed is 1 GiB, past the last-level
    cache of any server CPU (some hosts of this VM report 480 MiB of L3, which a 128 MiB
    buffer, as used before, fits: it read 37-43 GB/s where memory gives 25-27)."""
    big = torch.ones(1024 * 1024 * 1024 // 4)
    bw = big.numel() * 4 / timeit(big.sum, 3)
    del big
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    rate = 2 * 1024**3 / timeit(lambda: a @ b, 10)
    return {"read_bandwidth_Bps": bw, "matmul_flops": rate, "threads": torch.get_num_threads(),
            "platform": platform.platform()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def write_json(path: str | Path, payload: dict) -> Path:
    """Write `payload` as JSON, atomically where `path` is a regular file (a temporary file
    renamed over it): a run killed while writing leaves the previous version, never half."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2)
    if out.exists() and not out.is_file():  # /dev/null and the like: no rename over those
        out.write_text(text)
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out
