"""The adapter registry: names -> validated PEFT adapters, kept in the adapter store, with a
CPU cache tier.

Tiers: device slots (the engine) <- CPU cache (this class, LRU under a byte budget) <- the
adapter store (`lorafold.server.store`: a folder, or an S3 bucket shared by every replica).
Registered weights are copied into the store from the very bytes that were validated, so
what is served is exactly what was checked, whatever later happens to the source folder.
Weights fetched from the store are checked against the manifest's sha256 digests and
re-validated before anything is served.

Thread-safe: registration, store reads and cold loads run in worker threads (never on the
event loop), except `get`'s one manifest GET for a name this replica has not seen yet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorafold.server.lora.peft_format import (
    AdapterError,
    AdapterFileOutsideRootError,
    LoRAAdapter,
    ModuleSpec,
    parse_adapter,
    read_adapter_files,
)
from lorafold.server.store import AdapterStore, Manifest, StoreIntegrityError
from lorafold.server.store.base import sha256_hex, verify_blob, wait_until_reachable
from lorafold.server.store.catalogue import Catalogue
from lorafold.server.store.file import FileStore

logger = logging.getLogger(__name__)
LEGACY_STATE = "registry.json"  # the per-server registry of earlier versions (see _migrate_legacy)


class PathNotAllowedError(AdapterError):
    """An adapter path (or a file in it) outside the configured adapter root."""


@dataclass(slots=True)
class Registration:
    """A name's registration as this replica sees it (usage counts are per replica)."""

    name: str
    content_hash: str
    source: str
    registered_at: float
    rank: int
    ranks: list[int]
    targets: list[str]
    size_bytes: int
    etag: str = ""
    requests_served: int = 0
    last_used: float | None = None


@dataclass(slots=True)
class TierStats:
    cpu_hits: int = 0
    cpu_misses: int = 0
    cpu_evictions: int = 0
    disk_loads: int = 0  # loads from the store (a folder or a bucket)
    load_seconds: list[float] = field(default_factory=list)  # drained by the metrics


def _adapter_bytes(adapter: LoRAAdapter) -> int:
    return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in adapter.modules.values())


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        adapter_root: Path,
        base_modules: Mapping[str, ModuleSpec],
        *,
        max_rank: int | None = None,
        cpu_cache_bytes: int = 1 << 30,
        refresh_seconds: float = 5.0,
    ) -> None:
        self.store = store
        self.adapter_root = Path(adapter_root)
        self.base_modules = dict(base_modules)
        self.max_rank = max_rank
        self.cpu_cache_bytes = cpu_cache_bytes
        self.stats = TierStats()
        self.catalogue = Catalogue(store, refresh_seconds=refresh_seconds, on_forget=self._drop_cached)
        self._lock = threading.RLock()
        self._usage: dict[str, tuple[int, float | None]] = {}  # name -> (requests served, last use)
        self._cache: OrderedDict[str, LoRAAdapter] = OrderedDict()  # content hash -> weights
        self._cache_bytes = 0
        self._loading: dict[str, threading.Lock] = {}  # content hash -> one fetch at a time

    # ---- the catalogue -------------------------------------------------------------------

    def restore(self) -> list[str]:
        """Read the store's whole catalogue (a fresh replica serves it all); the names."""
        wait_until_reachable(self.store)
        if isinstance(self.store, FileStore):
            self._migrate_legacy(self.store.root / LEGACY_STATE)
        return self.catalogue.sync()

    def _migrate_legacy(self, path: Path) -> None:
        """Import the registrations an earlier version kept in `registry.json` (+ adapters/<hash>/)
        into the store, once: each adapter is re-validated from its stored copy; a name the
        store already has keeps the store's binding. The old file is renamed, not deleted."""
        if not path.is_file():
            return
        try:
            entries = json.loads(path.read_text()).get("adapters", [])
        except (OSError, ValueError, AttributeError) as exc:
            logger.error("legacy registry %s is unreadable (%s); not migrated", path, exc)
            return
        for e in entries:
            try:
                folder = Path(e["folder"])
                config_raw, weights_raw = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
                if self.store.read_manifest(e["name"]) is None:
                    self._register(e["name"], config_raw, weights_raw, e.get("source", "migrated"))
            except (KeyError, TypeError, OSError, AdapterError) as exc:
                logger.error("legacy registration %r not migrated: %s", e.get("name") if isinstance(e, dict) else e, exc)
        path.replace(path.with_name(LEGACY_STATE + ".migrated"))
        logger.info("migrated %d registrations from %s into %s", len(entries), path, self.store.url)

    def start(self) -> None:
        """Poll the store for changes made through other replicas."""
        self.catalogue.start()

    def flush(self) -> None:
        """Stop polling (every write already reached the store when it returned)."""
        self.catalogue.stop()

    def _registration(self, manifest: Manifest, etag: str) -> Registration:
        served, last = self._usage.get(manifest.name, (0, None))
        return Registration(
            name=manifest.name, content_hash=manifest.content_hash, source=manifest.source,
            registered_at=manifest.registered_at, rank=manifest.rank, ranks=list(manifest.ranks),
            targets=list(manifest.targets), size_bytes=manifest.size_bytes, etag=etag,
            requests_served=served, last_used=last,
        )

    # ---- registration (blocking: run in a worker thread) ---------------------------------

    def resolve_path(self, path: str) -> Path:
        """Confine `path` (absolute, or relative to the adapter root) to the adapter root."""
        root = self.adapter_root.resolve()
        candidate = Path(path).expanduser()
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()  # follows symlinks
        if resolved != root and root not in resolved.parents:
            raise PathNotAllowedError(
                f"path {path!r} is outside the adapter root {root}; copy the adapter under it or upload it"
            )
        if not resolved.is_dir():
            raise AdapterError(f"adapter folder {path!r} does not exist under the adapter root {root}")
        return resolved

    def register_folder(self, name: str, folder: Path, source: str | None = None) -> Registration:
        """Validate `folder` (every file confined to the adapter root), store a copy, bind `name`."""
        try:
            config_raw, weights_raw = read_adapter_files(folder, self.adapter_root)
        except AdapterFileOutsideRootError as exc:
            raise PathNotAllowedError(str(exc)) from exc
        return self._register(name, config_raw, weights_raw, source or str(folder))

    def register_upload(self, name: str, config: bytes, weights: bytes) -> Registration:
        return self._register(name, config, weights, "upload")

    def _register(self, name: str, config_raw: bytes, weights_raw: bytes, source: str) -> Registration:
        # The stored copy is written from the very bytes that were validated, never re-read
        # from the source, so a file swapped after the check cannot be served.
        adapter = parse_adapter(config_raw, weights_raw, self.base_modules, max_rank=self.max_rank, source=source)
        self.store.put_blob(adapter.content_hash, config_raw, weights_raw)
        manifest = Manifest(
            name=name, content_hash=adapter.content_hash, config_sha256=sha256_hex(config_raw),
            weights_sha256=sha256_hex(weights_raw), config=adapter.config, rank=adapter.max_rank,
            ranks=sorted(adapter.ranks), targets=list(adapter.target_names), size_bytes=adapter.nbytes,
            registered_at=time.time(), source=source,
        )
        etag = self.catalogue.publish(manifest)  # compare-and-swap: StoreConflictError on a race
        with self._lock:
            self._put_cache(adapter)
        logger.info("registered adapter %s (rank %d, %s) in %s", name, manifest.rank, manifest.content_hash[:12],
                    self.store.url)
        return self._registration(manifest, etag)

    def delete(self, name: str) -> Registration | None:
        """Unbind `name` in the store. Its blob stays (another name, or a replica's request in
        flight, may use the same weights); requests in flight hold their own copy and finish."""
        manifest = self.catalogue.remove(name)
        with self._lock:
            self._usage.pop(name, None)
        return None if manifest is None else self._registration(manifest, "")

    # ---- lookups -------------------------------------------------------------------------

    def get(self, name: str) -> Registration | None:
        """`name`'s registration; a name this replica has not seen is looked up in the store."""
        found = self.catalogue.lookup(name)
        return None if found is None else self._registration(*found)

    def names(self) -> list[str]:
        return self.catalogue.names()

    def entries(self) -> list[Registration]:
        return [self._registration(m, "") for m in self.catalogue.manifests()]

    def in_cpu_cache(self, content_hash: str) -> bool:
        with self._lock:
            return content_hash in self._cache

    def record_use(self, name: str) -> None:
        with self._lock:
            served, _ = self._usage.get(name, (0, None))
            self._usage[name] = (served + 1, time.time())

    # ---- the CPU tier --------------------------------------------------------------------

    def load(self, name: str) -> tuple[Registration, LoRAAdapter]:
        """The adapter's weights, from the CPU cache or (blocking) from the store."""
        found = self.catalogue.lookup(name)
        if found is None:
            raise KeyError(name)
        manifest, etag = found
        entry = self._registration(manifest, etag)
        with self._lock:
            cached = self._cached(manifest.content_hash)
            if cached is not None:
                return entry, cached
            self.stats.cpu_misses += 1
            gate = self._loading.setdefault(manifest.content_hash, threading.Lock())
        with gate:  # concurrent first requests for one adapter fetch it once
            with self._lock:
                cached = self._cache.get(manifest.content_hash)
            if cached is None:
                cached = self._fetch(manifest)
        with self._lock:
            self._loading.pop(manifest.content_hash, None)
        return entry, cached

    def _fetch(self, manifest: Manifest) -> LoRAAdapter:
        t0 = time.perf_counter()
        config_raw, weights_raw = self.store.get_blob(manifest.content_hash)
        verify_blob(manifest, config_raw, weights_raw)  # sha256 of the bytes, before parsing them
        adapter = parse_adapter(config_raw, weights_raw, self.base_modules, max_rank=self.max_rank,
                                source=f"{self.store.url} {manifest.name}")
        if adapter.content_hash != manifest.content_hash:
            raise StoreIntegrityError(f"adapter {manifest.name!r}: the stored weights hash to {adapter.content_hash[:16]}..., "
                                      f"the manifest says {manifest.content_hash[:16]}...; re-register the adapter")
        with self._lock:
            self.stats.disk_loads += 1
            self.stats.load_seconds.append(time.perf_counter() - t0)
            self._put_cache(adapter)
        return adapter

    def _cached(self, content_hash: str) -> LoRAAdapter | None:
        cached = self._cache.get(content_hash)
        if cached is not None:
            self._cache.move_to_end(content_hash)
            self.stats.cpu_hits += 1
        return cached

    def _put_cache(self, adapter: LoRAAdapter) -> None:
        if adapter.content_hash in self._cache:
            self._cache.move_to_end(adapter.content_hash)
            return
        self._cache[adapter.content_hash] = adapter
        self._cache_bytes += _adapter_bytes(adapter)
        while self._cache_bytes > self.cpu_cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= _adapter_bytes(evicted)
            self.stats.cpu_evictions += 1

    def _drop_cached(self, content_hash: str) -> None:
        """Weights no name uses any more leave the CPU tier (requests in flight hold their own copy)."""
        with self._lock:
            cached = self._cache.pop(content_hash, None)
            if cached is not None:
                self._cache_bytes -= _adapter_bytes(cached)

    @property
    def cpu_resident(self) -> int:
        with self._lock:
            return len(self._cache)
