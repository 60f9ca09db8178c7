"""Three `lorafold serve` replicas sharing one S3 bucket (a real SeaweedFS on loopback).

Register through one, serve through the others (outputs equal to the merged reference);
re-register while others stream (in flight on the old weights, then the new within the
bound); delete through one, the others 404 within the bound; kill -9 a replica, a fresh
empty one serves the whole catalogue; a tampered object, refused credentials and a store
that is down give clear errors while nothing is served wrong and the catalogue stays.

The tests are one scenario on one module-scoped cluster, in file order (pytest's): each
starts from the catalogue the previous ones left, so run the file, not a single test.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import make_peft_adapter, merged_model
from tests.store.replicas import ADMIN, USER, Replica, save_tiny_model, start_replica, wait_exit, wait_ready

REFRESH = 0.5  # --store-refresh-seconds of the replicas
BOUND = REFRESH + 3.0  # documented bound (refresh + one listing + one GET), with slack for a loaded CI box
PROMPT = [1, 504, 3300, 282, 253, 1530, 30, 3010]
STORE = "s3://adapters/cluster"


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    from lorafold.server.lora.peft_format import load_adapter
    from lorafold.server.models.loader import module_specs
    from lorafold.server.models.loader import load_base_model

    tmp = tmp_path_factory.mktemp("cluster")
    model_dir = save_tiny_model(tmp / "tiny")
    base = load_base_model(model_dir)
    root = tmp / "adapters"
    folders = {name: make_peft_adapter(base.model, root / name, r=r, seed=seed, strength=1.0,
                                       targets=["q_proj", "v_proj", "up_proj", "down_proj"])
               for name, r, seed in (("alpha", 4, 1), ("beta1", 8, 2), ("beta2", 8, 3), ("gamma", 4, 4), ("delta", 2, 5))}
    replicas = [start_replica(model_dir, root, tmp / f"r{i}", STORE, s3_server.env(), REFRESH) for i in range(3)]
    specs = module_specs(base.model)
    state = {"s3": s3_server, "tmp": tmp, "model_dir": model_dir, "root": root, "base": base, "specs": specs,
             "folders": folders, "replicas": [wait_ready(r) for r in replicas], "load": load_adapter}
    try:
        yield state
    finally:
        for r in state["replicas"]:
            r.stop()


def reference(cluster, folder: str, n: int = 12) -> str:
    """Greedy text of the base model with the adapter merged into its weights (HF generate)."""
    base, tok = cluster["base"].model, cluster["base"].tokenizer
    adapter = cluster["load"](cluster["folders"][folder], cluster["specs"])
    with torch.no_grad():
        out = merged_model(base, adapter).generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                                   max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(PROMPT):], skip_special_tokens=True)


def complete(r: Replica, model: str, n: int = 12, **extra) -> httpx.Response:
    return httpx.post(f"{r.url}/v1/completions", headers=USER, timeout=60,
                      json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, **extra})


def text(r: Replica, model: str, n: int = 12, **extra) -> str:
    resp = complete(r, model, n, **extra)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def register(r: Replica, name: str, folder: str) -> dict:
    resp = httpx.post(f"{r.url}/v1/adapters", json={"name": name, "path": folder}, headers=ADMIN, timeout=60)
    assert resp.status_code == 201, resp.text
    return resp.json()


def upload(r: Replica, name: str, folder: Path) -> httpx.Response:
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    return httpx.post(f"{r.url}/v1/adapters", data={"name": name}, files=files, headers=ADMIN, timeout=60)


def models(r: Replica) -> set[str]:
    resp = httpx.get(f"{r.url}/v1/models", headers=USER, timeout=10)
    assert resp.status_code == 200, resp.text
    return {m["id"] for m in resp.json()["data"][1:]}


def until(check, what: str) -> float:
    """Seconds until `check()` holds; fails after BOUND."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < BOUND, f"{what} not seen within {BOUND} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def content_hash(r: Replica, name: str) -> str | None:
    resp = httpx.get(f"{r.url}/v1/adapters/{name}", headers=ADMIN, timeout=10)
    return resp.json()["content_hash"] if resp.status_code == 200 else None


def test_registered_through_one_served_by_all(cluster):
    r1, r2, r3 = cluster["replicas"]
    info = register(r1, "alpha", "alpha")
    want = reference(cluster, "alpha")
    # r2 and r3 have never heard of alpha: each reads its manifest and weights on this first request
    assert text(r2, "alpha") == want and text(r3, "alpha") == want and text(r1, "alpha") == want
    assert text(r2, "alpha") != text(r2, "")  # the adapter changes the output
    for r in (r1, r2, r3):
        until(lambda r=r: "alpha" in models(r), "alpha in /v1/models")
        assert content_hash(r, "alpha") == info["content_hash"]


async def _stream(r: Replica, model: str, n: int, started: asyncio.Event) -> str:
    out = ""
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"{r.url}/v1/completions", json=body, headers=USER) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    out += json.loads(line[6:])["choices"][0]["text"]
                    started.set()
    return out


def test_reregistration_while_streaming(cluster):
    replicas = cluster["replicas"]
    r1, r2, r3 = replicas
    register(r1, "beta", "beta1")
    want1, want2 = reference(cluster, "beta1"), reference(cluster, "beta2")
    assert want1 != want2
    assert [text(r, "beta") for r in replicas] == [want1] * 3
    long_n = 240  # with the 8-token prompt, the 256-token context
    before = [text(r, "beta", long_n, ignore_eos=True) for r in replicas]  # the old weights' long answer, per replica

    async def scenario() -> tuple[list[str], list[bool], float]:
        events = [asyncio.Event() for _ in replicas]
        tasks = [asyncio.create_task(_stream(r, "beta", long_n, e)) for r, e in zip(replicas, events)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
        resp = await asyncio.to_thread(upload, r2, "beta", cluster["folders"]["beta2"])
        assert resp.status_code == 201, resp.text
        in_flight = [not t.done() for t in tasks]
        new_hash = resp.json()["content_hash"]
        seen = await asyncio.to_thread(lambda: max(until(lambda r=r: content_hash(r, "beta") == new_hash, "re-registration")
                                                   for r in (r1, r3)))
        in_flight = [a and not t.done() for a, t in zip(in_flight, tasks)]  # ...and once the others had swapped
        return await asyncio.gather(*tasks), in_flight, seen

    streamed, in_flight, seen = asyncio.run(scenario())
    # Every replica swapped while its stream was running: 240 tokens outlast the 0.5 s poll
    # (here the streams ended ~3 s after the last replica had swapped).
    assert all(in_flight), f"a stream finished before its replica swapped ({in_flight}); lengthen them"
    assert streamed == before  # every in-flight request finished on the old weights
    assert seen < BOUND
    assert [text(r, "beta") for r in replicas] == [want2] * 3  # new requests: the new weights


def test_concurrent_registrations_of_one_name(cluster):
    """Registrations of one name racing through two replicas: each answers 201 (its write went
    in) or 409 (it lost the compare-and-swap, and says so); never a silent overwrite or a 5xx.
    Every replica then converges on the one binding the store holds."""
    r1, r2, r3 = cluster["replicas"]
    folders = cluster["folders"]

    async def race() -> list[httpx.Response]:
        jobs = [asyncio.to_thread(upload, r, "race", folders[f]) for _ in range(4)
                for r, f in ((r1, "gamma"), (r2, "delta"))]
        return await asyncio.gather(*jobs)

    responses = asyncio.run(race())
    assert {r.status_code for r in responses} <= {201, 409}, [r.text for r in responses if r.status_code not in (201, 409)]
    assert any(r.status_code == 201 for r in responses)
    for r in responses:
        if r.status_code == 409:
            assert "another replica" in r.json()["error"]["message"]
    final = cluster["s3"].client().get_object(Bucket="adapters", Key="cluster/manifests/race.json")["Body"].read()
    final_hash = json.loads(final)["content_hash"]
    assert final_hash in {r.json()["content_hash"] for r in responses if r.status_code == 201}
    for r in (r1, r2, r3):
        until(lambda r=r: content_hash(r, "race") == final_hash, "the final binding")
    assert httpx.delete(f"{r1.url}/v1/adapters/race", headers=ADMIN, timeout=30).status_code == 200


def test_deletion_seen_within_bound(cluster):
    r1, r2, r3 = cluster["replicas"]
    assert httpx.delete(f"{r3.url}/v1/adapters/alpha", headers=ADMIN, timeout=30).status_code == 200
    assert complete(r3, "alpha").status_code == 404
    for r in (r1, r2):
        until(lambda r=r: complete(r, "alpha").status_code == 404, "deletion")
        assert "alpha" not in models(r)
    assert httpx.delete(f"{r1.url}/v1/adapters/alpha", headers=ADMIN, timeout=30).status_code == 404


def test_killed_replica_replaced_by_an_empty_one(cluster):
    r1, r2, _ = cluster["replicas"]
    register(r2, "gamma", "gamma")
    register(r2, "delta", "delta")
    r1.kill9()
    fresh = wait_ready(start_replica(cluster["model_dir"], cluster["root"], cluster["tmp"] / "r4", STORE,
                                     cluster["s3"].env(), REFRESH))
    cluster["replicas"][0] = fresh
    assert models(fresh) == {"beta", "gamma", "delta"}  # the whole catalogue, no registration step
    assert text(fresh, "beta") == reference(cluster, "beta2")
    assert text(fresh, "gamma") == reference(cluster, "gamma")


def test_tampered_object_is_refused(cluster):
    _, r2, r3 = cluster["replicas"]
    s3 = cluster["s3"].client()
    key = f"cluster/blobs/{content_hash(r3, 'gamma')}/adapter_model.safetensors"
    original = s3.get_object(Bucket="adapters", Key=key)["Body"].read()
    tampered = original[:-8] + bytes(b ^ 0x40 for b in original[-8:])  # same size, other weights
    s3.put_object(Bucket="adapters", Key=key, Body=tampered)
    try:
        resp = complete(r3, "gamma")  # r3 has never loaded gamma
        assert resp.status_code == 502, resp.text
        assert "altered" in resp.json()["error"]["message"] and "re-register" in resp.json()["error"]["message"]
        assert "gamma" in models(r3) and content_hash(r3, "gamma") is not None  # catalogue unchanged
        assert text(r3, "beta") == reference(cluster, "beta2")  # the rest is served
        assert upload(r2, "gamma", cluster["folders"]["gamma"]).status_code == 201  # what the error says to do
        assert s3.get_object(Bucket="adapters", Key=key)["Body"].read() == original  # the blob is repaired
        assert text(r3, "gamma") == reference(cluster, "gamma")  # and nothing bad was cached
    finally:
        s3.put_object(Bucket="adapters", Key=key, Body=original)


def test_wrong_credentials_or_url_refuse_to_start(cluster):
    """Checked before the model loads: exit status 2 and one line naming the fix, no traceback."""
    for store, env, says in ((STORE, cluster["s3"].env(secret_key="not-the-secret"), "AWS_SECRET_ACCESS_KEY"),
                             ("gs://adapters", cluster["s3"].env(), "use file:///PATH or s3://BUCKET/PREFIX"),
                             ("s3://no-such-bucket/x", cluster["s3"].env(), "does not exist; create it")):
        bad = start_replica(cluster["model_dir"], cluster["root"], cluster["tmp"] / "bad", store, env, REFRESH)
        log = wait_exit(bad)
        assert bad.proc.returncode == 2 and says in log and "Traceback" not in log, log


def test_store_down_keeps_the_catalogue(cluster):
    fresh, r2, _ = cluster["replicas"]
    want_beta = reference(cluster, "beta2")
    assert text(r2, "beta") == want_beta  # cached in r2's CPU tier
    assert "lorafold_adapter_store_up 1.0" in httpx.get(f"{r2.url}/metrics", timeout=10).text
    cluster["s3"].stop()
    time.sleep(3 * REFRESH)  # a few failed polls
    assert text(r2, "beta") == want_beta
    assert models(r2) == {"beta", "gamma", "delta"}
    scrape = httpx.get(f"{r2.url}/metrics", timeout=10).text
    assert "lorafold_adapter_store_up 0.0" in scrape  # the outage is visible to monitoring
    resp = complete(fresh, "delta")  # fresh has the manifest, not the weights
    assert resp.status_code == 503 and "unreachable" in resp.json()["error"]["message"], resp.text
    resp = upload(r2, "epsilon", cluster["folders"]["alpha"])
    assert resp.status_code == 503, resp.text
    assert complete(r2, "epsilon").status_code == 503  # an unknown name cannot be looked up: 503, not 404
    assert models(r2) == {"beta", "gamma", "delta"}
