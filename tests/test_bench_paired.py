"""`bench_many_adapters`' closed loops taking turns (`--paired-turn`): each loop serves exactly
its own requests, as it would alone, and is timed only over its own steps."""

from __future__ import annotations

import time

import torch

from benchmarks.bench_many_adapters import ClosedLoop, make_adapters, run_paired, run_scenario, weight_bank
from lorafold.server.engine.engine import LLMEngine
from tests.engine.test_engine import tiny_engine


def loop(engine: LLMEngine, bank, n: int, popularity: str, seed: int) -> ClosedLoop:  # noqa: ANN001
    return ClosedLoop(engine, make_adapters(bank, n, f"{popularity}{n}"), popularity, streams=3, per_stream=2,
                      prompt_tokens=6, max_tokens=5, seed=seed)


@torch.no_grad()
def test_loops_taking_turns_serve_what_they_would_alone_on_their_own_clocks() -> None:
    (first, _), (second, _) = tiny_engine(max_loras=3), tiny_engine(max_loras=3)
    bank = weight_bank(first.runner.base_modules(), 16)
    # alone: 5 adapters on 3 slots (loads and evictions), and 2 zipf-drawn ones
    alone = [run_scenario(first, make_adapters(bank, 5, "uniform5"), "uniform", 3, 2, 6, 5, seed=0),
             run_scenario(second, make_adapters(bank, 2, "zipf2"), "zipf", 3, 2, 6, 5, seed=1)]
    assert alone[0]["evictions_per_request"] > 0
    a, b = loop(first, bank, 5, "uniform", 0), loop(second, bank, 2, "zipf", 1)
    t0 = time.perf_counter()
    paired = run_paired(a, b, turn_steps=2)
    wall = time.perf_counter() - t0
    for got, ref in zip(paired, alone):
        assert got["generated_tokens"] == ref["generated_tokens"] == 3 * 2 * 5
        assert got["steps"] == ref["steps"]  # the same schedule, step for step
        assert got["loads_per_request"] == ref["loads_per_request"]
    assert a.done and b.done and not first.has_unfinished() and not second.has_unfinished()
    # each clock covers only its own steps: together no more than the time both took
    assert 0 < a.clock and 0 < b.clock and a.clock + b.clock <= wall
    assert len(a.ttft) == len(b.ttft) == 6 and all(0 < t <= a.clock for t in a.ttft)
