"""HTTP service under load, through a real uvicorn server on loopback with SmolLM2.

    python -m benchmarks.bench_http [--requests 200] [--clients 32] [--adapters 16]

1. Register a rank-16 adapter and stream a request to it right after the registration call
   returns: time to first token (target: < 1 s on 2 cores), repeated for several adapters.
2. `--requests` streaming requests from `--clients` concurrent clients spread over
   `--adapters` adapters (and the base): errors, throughput, TTFT/ITL percentiles, and the
   KV blocks in use once all finished (target: zero errors, zero leaked blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks._common import percentile, write_json
from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.host_memory import keep_freed_memory
from lorafold.server.models.loader import LLAMA_TARGETS, load_base_model
from tests.conftest import make_peft_adapter
from tests.server.live import live_server

ADMIN = {"Authorization": "Bearer admin"}
USER = {"Authorization": "Bearer user"}


async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, last, gaps, n = None, None, [], 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with client.stream("POST", "/v1/completions", json=body, headers=USER) as resp:
        if resp.status_code != 200:
            return {"error": f"{resp.status_code} {(await resp.aread())[:200]!r}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
            n += 1
    return {"ttft": first, "gaps": gaps, "chunks": n, "seconds": time.perf_counter() - t0}


async def register_then_request(url: str, names: list[str]) -> list[dict]:
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for name in names:
            r = await client.post("/v1/adapters", json={"name": name, "path": name}, headers=ADMIN)
            r.raise_for_status()
            t0 = time.perf_counter()
            res = await stream_one(client, name, "Hello, my name is", 4)
            out.append({"adapter": name, "first_token_after_registration_s": res["ttft"] if "ttft" in res else None,
                        "wall_s": time.perf_counter() - t0, **({"error": res["error"]} if "error" in res else {})})
    return out


async def load_test(url: str, n_requests: int, n_clients: int, models: list[str], max_tokens: int) -> dict:
    rng = random.Random(0)
    jobs = [(rng.choice(models), f"Request {i}: tell me about topic {rng.randint(0, 999)}.") for i in range(n_requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[dict] = []

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while not queue.empty():
                model, prompt = queue.get_nowait()
                try:
                    results.append(await stream_one(client, model, prompt, max_tokens))
                except httpx.HTTPError as exc:
                    results.append({"error": repr(exc)})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    wall = time.perf_counter() - t0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.sleep(0.5)
        metrics = (await client.get("/metrics")).text
    kv_used = next(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("lorafold_kv_blocks_used "))
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["chunks"] for r in ok)
    return {"requests": n_requests, "clients": n_clients, "adapters": len(models) - 1,
            "errors": len(results) - len(ok), "error_samples": [r["error"] for r in results if "error" in r][:3],
            "seconds": wall, "streamed_tokens_per_s": tokens / wall, "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99), "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
            "kv_blocks_used_after": kv_used}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/http.json")
    args = parser.parse_args()
    keep_freed_memory()  # as `lorafold serve` does at start (process-wide malloc settings)
    bm = load_base_model()
    root = Path(tempfile.mkdtemp(prefix="lorafold-http-"))
    names = [f"ad{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        make_peft_adapter(bm.model, root / "adapters" / name, r=16, alpha=32, seed=i, targets=LLAMA_TARGETS, strength=0.3)
    settings = ServerSettings(adapter_root=root / "adapters", state_dir=root / "state", api_keys=("user",),
                              admin_key="admin", measure_kv_blocks=False,
                              engine=EngineConfig(max_loras=min(16, args.adapters), max_num_seqs=32, max_model_len=512,
                                                  num_kv_blocks=512, max_queue=512))
    with live_server(settings, bm) as url:
        reg = asyncio.run(register_then_request(url, names[:4]))
        for name in names[4:]:
            httpx.post(f"{url}/v1/adapters", json={"name": name, "path": name}, headers=ADMIN, timeout=120).raise_for_status()
        load = asyncio.run(load_test(url, args.requests, args.clients, names + [bm.name], args.max_tokens))
    lat = [r["first_token_after_registration_s"] for r in reg if r.get("first_token_after_registration_s") is not None]
    print(f"{'adapter':<8} {'first token after registration (s)':>36}")
    for r in reg:
        print(f"{r['adapter']:<8} {r.get('first_token_after_registration_s') or float('nan'):>36.3f}")
    print(f"\nload: {load['requests']} streaming requests, {load['clients']} clients, {load['adapters']} adapters + base")
    for key in ("errors", "seconds", "streamed_tokens_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
                "kv_blocks_used_after"):
        print(f"  {key:<24} {load[key]:.3f}" if isinstance(load[key], float) else f"  {key:<24} {load[key]}")
    out = write_json(args.out, {"benchmark": "http", "registration": reg, "load": load,
                                "targets": {"first_token_after_registration_s": 1.0, "errors": 0, "kv_blocks_used_after": 0},
                                "max_first_token_after_registration_s": max(lat) if lat else None})
    print(f"wrote {out}")
    return 0 if load["errors"] == 0 and load["kv_blocks_used_after"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
