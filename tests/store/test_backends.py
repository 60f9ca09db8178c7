"""The AdapterStore contract, on both backends: the file store and a real S3 server (SeaweedFS).

Blobs round-trip byte for byte; manifests are compare-and-swapped on their ETag (a stale or
missing expectation loses, never overwrites); the catalogue view sees other writers' changes;
and an unreachable store, refused credentials and altered objects raise errors naming them.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from lorafold.server.store import (
    Manifest,
    StoreAuthError,
    StoreConflictError,
    StoreIntegrityError,
    StoreUnavailableError,
    open_store,
)
from lorafold.server.store.base import sha256_hex, verify_blob
from lorafold.server.store.catalogue import Catalogue
from tests.server.live import free_port


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    server = request.getfixturevalue("s3_server")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return open_store(f"s3://{server.bucket}/t-{uuid.uuid4().hex[:8]}")


def manifest(name: str, config: bytes = b'{"r": 4}', weights: bytes = b"w" * 100) -> Manifest:
    return Manifest(name=name, content_hash=sha256_hex(weights + config), config_sha256=sha256_hex(config),
                    weights_sha256=sha256_hex(weights), config={"r": 4}, rank=4, ranks=[4], targets=["q_proj"],
                    size_bytes=len(weights), registered_at=time.time(), source="test")


def test_blob_round_trip_and_idempotent_put(store):
    m = manifest("a")
    with pytest.raises(StoreIntegrityError, match="missing"):  # a manifest naming no blob: re-register
        store.get_blob(m.content_hash)
    store.put_blob(m.content_hash, b'{"r": 4}', b"w" * 100)
    store.put_blob(m.content_hash, b'{"r": 4}', b"w" * 100)  # same hash again: no error
    config, weights = store.get_blob(m.content_hash)
    assert (config, weights) == (b'{"r": 4}', b"w" * 100)
    verify_blob(m, config, weights)
    with pytest.raises(StoreIntegrityError, match="altered"):
        verify_blob(m, config, weights[:-1] + b"x")


def test_manifest_compare_and_swap(store):
    v1, v2, v3 = manifest("org/name"), manifest("org/name", weights=b"v" * 10), manifest("org/name", weights=b"u" * 10)
    assert store.read_manifest("org/name") is None
    e1 = store.write_manifest(v1, expect_etag=None)
    with pytest.raises(StoreConflictError):  # create-only loses to an existing manifest
        store.write_manifest(v2, expect_etag=None)
    got, etag = store.read_manifest("org/name")
    assert got.content_hash == v1.content_hash and etag == e1
    e2 = store.write_manifest(v2, expect_etag=e1)
    assert e2 != e1
    with pytest.raises(StoreConflictError):  # a writer holding the old ETag loses; v2 survives
        store.write_manifest(v3, expect_etag=e1)
    assert store.read_manifest("org/name")[0].content_hash == v2.content_hash
    assert store.list_manifests() == {"org/name": e2}
    with pytest.raises(StoreConflictError):
        store.delete_manifest("org/name", expect_etag=e1)
    store.delete_manifest("org/name", expect_etag=e2)
    assert store.read_manifest("org/name") is None and store.list_manifests() == {}


def test_two_catalogues_see_each_other(store):
    """Two replicas' views of one store: a publish is found on first lookup, a re-publish and a
    delete by one reach the other's view through its sync (the poller's one call)."""
    a, b = Catalogue(store, refresh_seconds=60), Catalogue(store, refresh_seconds=60)
    forgotten: list[str] = []
    b.on_forget = forgotten.append
    assert b.lookup("x") is None
    v1 = manifest("x")
    a.publish(v1)
    assert b.lookup("x") is None  # remembered miss, for miss_ttl (1 s)...
    assert b.sync() == ["x"]  # ...but a sync (the poller) sees it
    v2 = manifest("x", weights=b"second")
    a.publish(v2)
    assert b.get("x")[0].content_hash == v1.content_hash  # b has not polled yet
    b.sync()
    assert b.get("x")[0].content_hash == v2.content_hash and forgotten == [v1.content_hash]
    a.remove("x")
    b.sync()
    assert b.get("x") is None and b.names() == [] and forgotten[-1] == v2.content_hash
    # a lost race: b publishes from a stale read while a wrote in between
    a.publish(v1)
    current = store.read_manifest("x")
    a.publish(v2)
    with pytest.raises(StoreConflictError):
        store.write_manifest(manifest("x", weights=b"third"), expect_etag=current[1])
    assert store.read_manifest("x")[0].content_hash == v2.content_hash


def test_corrupt_manifest_is_named(store):
    store.write_manifest(manifest("good"), expect_etag=None)
    if hasattr(store, "root"):
        (store.root / "manifests" / "bad.json").write_bytes(b"{not json")
    else:
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}manifests/bad.json", Body=b"{not json")
    with pytest.raises(StoreIntegrityError, match="manifests/bad.json"):
        store.read_manifest("bad")
    assert Catalogue(store).sync() == ["good"]  # one bad manifest does not hide the catalogue


def test_s3_wrong_credentials_and_store_down(s3_server, monkeypatch):
    for key, value in s3_server.env(secret_key="wrong").items():
        monkeypatch.setenv(key, value)
    store = open_store(f"s3://{s3_server.bucket}/x")
    with pytest.raises(StoreAuthError, match="refused the credentials"):
        store.check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        open_store(f"s3://{s3_server.bucket}/x").read_manifest("a")
    assert time.monotonic() - t0 < 10
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.env()["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(StoreAuthError, match="does not exist"):
        open_store("s3://no-such-bucket/x").check()


def test_store_urls():
    with pytest.raises(ValueError, match="three slashes"):
        open_store("file://relative/path")
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_store("gs://bucket")
    with pytest.raises(ValueError, match="names no bucket"):
        open_store("s3:///prefix")


def test_longest_names_fit_every_backend(store):
    """A 128-character name of '/' quotes to 384 bytes: the file store hashes such file names."""
    names = ["/".join(["a"] * 64) + "b" * 1, "x" * 128, "org/model-v1.2_final"]
    for name in names:
        store.write_manifest(manifest(name), expect_etag=None)
    assert set(store.list_manifests()) == set(names)
    for name in names:
        assert store.read_manifest(name)[0].name == name


def test_manifest_from_a_newer_writer_is_read():
    """A rolling upgrade: a newer replica's manifest with fields this version lacks still reads."""
    data = json.loads(manifest("n").to_bytes())
    data["added_later"] = {"x": 1}
    raw = json.dumps(data).encode()
    assert Manifest.from_bytes(raw, "k").name == "n"
    del data["weights_sha256"]
    with pytest.raises(StoreIntegrityError, match="not a valid lorafold manifest"):
        Manifest.from_bytes(json.dumps(data).encode(), "k")
    with pytest.raises(StoreIntegrityError):
        Manifest.from_bytes(b"[1, 2]", "k")


def test_an_unreachable_store_is_retried_then_named(s3_server, monkeypatch):
    """At start a replica waits for a store that is still coming up (compose, a fresh cluster);
    refused credentials are not retried."""
    from lorafold.server.store.base import wait_until_reachable

    for key, value in s3_server.env(secret_key="wrong").items():
        monkeypatch.setenv(key, value)
    t0 = time.monotonic()
    with pytest.raises(StoreAuthError):
        wait_until_reachable(open_store(f"s3://{s3_server.bucket}/x"), patience_s=30)
    assert time.monotonic() - t0 < 5
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        wait_until_reachable(open_store("s3://adapters/x"), patience_s=1.5)
    assert 1.5 <= time.monotonic() - t0 < 15
