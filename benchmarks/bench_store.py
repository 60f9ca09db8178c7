"""Adapter store across replicas: cold adapter to first token, and registration to visibility.

    python -m benchmarks.bench_store [--adapters 12] [--trials 8] [--refresh 5]

Two `lorafold serve` processes (SmolLM2, rank-16 adapters on all seven targets, ~20 MB of
fp32 weights each) share one store, first the embedded `file://` store (a folder both
processes see: the single-host baseline), then an S3 bucket (SeaweedFS on loopback).

1. Cold adapter to first token: register an adapter through replica A, then stream one
   request for it through replica B, which has never seen it (manifest read, weights fetched
   and sha256-checked, parsed, loaded into a device slot, prefill). Beside it: the same
   request again on B (warm: resident), the baseline every cold number is paid on top of.
2. Registration to visible on all replicas: re-register a name through A with new weights;
   time until B reports the new content hash (bounded by --refresh, the poll interval), and
   for a new name, time until B lists it in /v1/models versus until B serves it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks._common import percentile, write_json
from lorafold.server.models.assets import default_model_dir
from lorafold.server.models.loader import LLAMA_TARGETS, load_base_model
from tests.conftest import make_peft_adapter
from tests.store.replicas import ADMIN, USER, Replica, start_replica, wait_ready
from tests.store.seaweed import seaweedfs

PROMPT = "Write one sentence about the sea."


def upload(r: Replica, name: str, folder: Path) -> str:
    """Register by upload through `r`; the content hash."""
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    resp = httpx.post(f"{r.url}/v1/adapters", data={"name": name}, files=files, headers=ADMIN, timeout=120)
    resp.raise_for_status()
    return resp.json()["content_hash"]


def ttft(r: Replica, model: str) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{r.url}/v1/completions", json=body, headers=USER, timeout=120) as resp:
        resp.raise_for_status()
        first = None
        for line in resp.iter_lines():  # read to the end: the request is not left running
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no token streamed")
    return first


def content_hash(r: Replica, name: str) -> str | None:
    resp = httpx.get(f"{r.url}/v1/adapters/{name}", headers=ADMIN, timeout=30)
    return resp.json()["content_hash"] if resp.status_code == 200 else None


def listed(r: Replica, name: str) -> bool:
    return name in {m["id"] for m in httpx.get(f"{r.url}/v1/models", headers=USER, timeout=30).json()["data"]}


def wait_for(check, limit: float = 120.0) -> float:
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > limit:
            raise RuntimeError("not visible within the limit")
        time.sleep(0.02)
    return time.perf_counter() - t0


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_s": percentile(xs, 50), "p99_s": percentile(xs, 99), "max_s": max(xs)}


def measure(store_url: str, env: dict, folders: list[Path], args: argparse.Namespace, work: Path) -> dict:
    model = default_model_dir()
    a, b = (start_replica(model, work / "adapters", work / f"{store_url[:4]}-{i}", store_url, env, args.refresh)
            for i in range(2))
    try:
        wait_ready(a, 300), wait_ready(b, 300)
        cold, warm = [], []
        for i, folder in enumerate(folders):
            upload(a, f"cold-{i}", folder)
            cold.append(ttft(b, f"cold-{i}"))
            warm.append(ttft(b, f"cold-{i}"))
        rereg, listing, serving = [], [], []
        for t in range(args.trials):
            old, new = folders[t % len(folders)], folders[(t + 1) % len(folders)]
            old_hash = upload(a, "moving", old)
            wait_for(lambda h=old_hash: content_hash(b, "moving") == h)  # B knows the name, on the old weights
            new_hash = upload(a, "moving", new)
            rereg.append(wait_for(lambda h=new_hash: content_hash(b, "moving") == h))  # from the registration's return
            upload(a, f"served-{t}", old)
            serving.append(ttft(b, f"served-{t}"))  # a new name's first request: read from the store at once
            upload(a, f"listed-{t}", old)
            listing.append(wait_for(lambda n=f"listed-{t}": listed(b, n)))  # no request: the poller lists it
        return {"cold_first_token": stats(cold), "warm_first_token": stats(warm),
                "reregistration_visible": stats(rereg), "new_name_listed": stats(listing),
                "new_name_first_token": stats(serving)}
    finally:
        a.stop(), b.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=12)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--refresh", type=float, default=5.0, help="--store-refresh-seconds of the replicas")
    parser.add_argument("--out", default="benchmarks/results/store.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        work = Path(tmp)
        base = load_base_model()
        folders = [make_peft_adapter(base.model, work / "adapters" / f"a{i}", r=16, seed=100 + i, targets=LLAMA_TARGETS)
                   for i in range(max(args.adapters, 2))]
        del base
        results = {"file": measure(f"file://{work / 'store'}", {}, folders, args, work)}
        with seaweedfs(work / "seaweedfs") as s3:
            results["s3"] = measure("s3://adapters/bench", s3.env(), folders, args, work)
    rows = [("cold adapter -> first token", "cold_first_token"), ("warm adapter -> first token", "warm_first_token"),
            ("re-registration visible on B", "reregistration_visible"), ("new name served on B (1st token)", "new_name_first_token"),
            ("new name listed on B /v1/models", "new_name_listed")]
    print(f"\n{'':36s} {'file p50':>9s} {'file p99':>9s} {'s3 p50':>9s} {'s3 p99':>9s}  (seconds; refresh {args.refresh} s)")
    for label, key in rows:
        f, s = results["file"][key], results["s3"][key]
        print(f"{label:36s} {f['p50_s']:9.3f} {f['p99_s']:9.3f} {s['p50_s']:9.3f} {s['p99_s']:9.3f}")
    out = write_json(args.out, {"benchmark": "store", "args": vars(args), "results": results})
    print(f"\nwrote {out}")
    print(json.dumps({k: {r: v[r]["p50_s"] for r in v} for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
