"""Throughput with half the requests schema-constrained vs none, on SmolLM2, in one run.

    python -m benchmarks.bench_structured [--requests 16] [--tokens 32] [--rounds 2]

The engine runs in-process (no HTTP): the same requests (same prompts and seeds, sampled at
temperature 1) once free and once with every other request constrained to a JSON schema,
interleaved over rounds so machine drift hits both alike. Reports tokens/s of each, their
ratio, and the grammar's own cost: the host time filling the masks per constrained token
(timed inside the engine by wrapping `GrammarState.fill`). Writes
benchmarks/results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks._common import write_json
from lorafold.server.engine import structured
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.engine import LLMEngine
from lorafold.server.engine.host_memory import keep_freed_memory
from lorafold.server.engine.sampling_params import GrammarSpec, SamplingParams
from lorafold.server.models.loader import load_base_model

# The story's minLength keeps every constrained request generating for the whole run (no
# early finish), so both modes generate exactly requests x tokens tokens.
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0},
                   "story": {"type": "string", "minLength": 600}},
    "required": ["name", "age", "story"], "additionalProperties": False,
}


class FillTimer:
    """Wraps GrammarState.fill to add up the host time spent building masks."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._fill = structured.GrammarState.fill

    def __enter__(self) -> FillTimer:
        timer, fill = self, self._fill

        def timed(state, bitmask, row):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            fill(state, bitmask, row)
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1

        structured.GrammarState.fill = timed
        return self

    def __exit__(self, *exc: object) -> None:
        structured.GrammarState.fill = self._fill


def run(engine: LLMEngine, constrained: bool, n: int, tokens: int, round_: int) -> tuple[float, int, FillTimer]:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    engine.grammars.compile(spec)  # compiled once per server in real use: not part of the timing
    prompt = engine.tokenizer("Describe a person as JSON:", add_special_tokens=False)["input_ids"]
    for i in range(n):
        grammar = spec if constrained and i % 2 == 0 else None
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=True, grammar=grammar)
        engine.add_request(f"r{round_}-{int(constrained)}-{i}", prompt, params)
    generated = 0
    with FillTimer() as timer:
        t0 = time.perf_counter()
        while engine.has_unfinished():
            generated += sum(len(o.token_ids) for o in engine.step())
        elapsed = time.perf_counter() - t0
    return generated / elapsed, generated, timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    args = parser.parse_args()
    keep_freed_memory()  # as `lorafold serve` does at start (process-wide malloc settings)
    base = load_base_model()
    # one engine for every run: both modes see the same weights, caches and allocator state
    engine = LLMEngine(base.model, base.tokenizer, EngineConfig(
        num_kv_blocks=1024, max_num_seqs=args.requests, max_num_batched_tokens=512, max_loras=2, max_queue=1024))
    rates: dict[str, list[float]] = {"none": [], "half": []}
    fill_us: list[float] = []
    for round_ in range(args.rounds):
        for label in ("none", "half"):
            rate, _, timer = run(engine, label == "half", args.requests, args.tokens, round_)
            rates[label].append(rate)
            if timer.calls:
                fill_us.append(1e6 * timer.seconds / timer.calls)
    none, half = statistics.median(rates["none"]), statistics.median(rates["half"])
    mask_us = statistics.median(fill_us) if fill_us else 0.0
    print(f"SmolLM2, {args.requests} requests x {args.tokens} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'requests constrained':<24}{'tokens/s':>10}{'vs none':>10}")
    print(f"{'none':<24}{none:>10.1f}{1.0:>10.2f}")
    print(f"{'half (JSON schema)':<24}{half:>10.1f}{half / none:>10.2f}")
    print(f"mask fill per constrained token: {mask_us:.1f} us (host)")
    write_json(args.out, {"requests": args.requests, "tokens": args.tokens, "rounds": args.rounds,
                          "tokens_per_s": {"none": rates["none"], "half": rates["half"]},
                          "median_tokens_per_s": {"none": none, "half": half}, "ratio": half / none,
                          "mask_fill_us_per_token": mask_us})


if __name__ == "__main__":
    main()
