"""One replica's view of the store's catalogue: name -> (manifest, ETag), kept fresh.

Three ways a change reaches this view: this replica writes it (`publish`, `remove`); a
request names an adapter the view lacks (`lookup` reads its manifest at once); or the
poller lists the manifests every `refresh_seconds` and re-reads those whose ETag changed.
So a registration made through any replica is served by every other one from its first
request, and a re-registration or deletion is seen within `refresh_seconds` (plus one
listing's latency). Torch-free: weights are the registry's business.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from lorafold.server.store.base import AdapterStore, Manifest, StoreError

logger = logging.getLogger(__name__)
_MAX_MISSES = 10_000  # remembered unknown names (bounded: a flood of random names cannot grow it)


class Catalogue:
    def __init__(self, store: AdapterStore, *, refresh_seconds: float = 5.0, miss_ttl: float = 1.0,
                 on_forget: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.miss_ttl = min(miss_ttl, refresh_seconds)
        self.on_forget = on_forget  # called with a content hash no name uses any more
        self.last_error: str | None = None
        self.last_sync: float | None = None  # wall time of the last successful listing
        self._lock = threading.RLock()
        self._entries: dict[str, tuple[Manifest, str]] = {}
        self._misses: dict[str, float] = {}  # name -> monotonic time it was found absent
        self._touched: dict[str, float] = {}  # name -> monotonic time this replica last wrote it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the view ------------------------------------------------------------------------

    def get(self, name: str) -> tuple[Manifest, str] | None:
        with self._lock:
            return self._entries.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def manifests(self) -> list[Manifest]:
        with self._lock:
            return [self._entries[n][0] for n in sorted(self._entries)]

    def lookup(self, name: str) -> tuple[Manifest, str] | None:
        """The view's entry, or (blocking, one GET) the store's: how a replica learns of an
        adapter registered elsewhere on that adapter's first request. Raises StoreError."""
        with self._lock:
            hit = self._entries.get(name)
            missed = self._misses.get(name)
            if hit is not None or (missed is not None and time.monotonic() - missed < self.miss_ttl):
                return hit
        started = time.monotonic()
        found = self.store.read_manifest(name)
        with self._lock:
            if self._touched.get(name, 0.0) > started:  # written here meanwhile: that is newer
                return self._entries.get(name)
            if found is None:
                if len(self._misses) >= _MAX_MISSES:
                    self._misses.clear()
                self._misses[name] = time.monotonic()
                self._forget(name)
                return None
            self._adopt(*found)
            return found

    # ---- writes (compare-and-swap through the store) --------------------------------------

    def publish(self, manifest: Manifest) -> str:
        """Bind manifest.name to its weights; StoreConflictError if another writer raced us."""
        current = self.store.read_manifest(manifest.name)
        etag = self.store.write_manifest(manifest, expect_etag=None if current is None else current[1])
        with self._lock:
            self._touched[manifest.name] = time.monotonic()
            self._adopt(manifest, etag)
        return etag

    def remove(self, name: str) -> Manifest | None:
        """Delete `name` from the store (None if it is not registered there)."""
        current = self.store.read_manifest(name)
        if current is not None:
            self.store.delete_manifest(name, expect_etag=current[1])
        with self._lock:
            self._touched[name] = time.monotonic()
            local = self._entries.get(name)
            self._forget(name)
        return current[0] if current is not None else (local[0] if local is not None else None)

    # ---- keeping the view fresh ------------------------------------------------------------

    def sync(self) -> list[str]:
        """List the store, re-read manifests whose ETag changed, drop the deleted; the names."""
        started = time.monotonic()
        listing = self.store.list_manifests()
        with self._lock:
            known = {n: etag for n, (_, etag) in self._entries.items()}
        changed = [n for n, etag in listing.items() if known.get(n) != etag]
        with ThreadPoolExecutor(max_workers=8) as pool:  # a fresh replica reads the whole catalogue
            fetched = list(pool.map(self._read_or_none, changed))
        with self._lock:
            for name in changed:
                self._misses.pop(name, None)
            for name, found in zip(changed, fetched):
                if self._touched.get(name, 0.0) <= started and found is not None:
                    self._adopt(*found)
            for name, etag in known.items():
                if name not in listing and self._touched.get(name, 0.0) <= started and self._entries.get(name, (None, None))[1] == etag:
                    self._forget(name)
            self.last_sync, self.last_error = time.time(), None
            return sorted(self._entries)

    def _read_or_none(self, name: str) -> tuple[Manifest, str] | None:
        try:
            return self.store.read_manifest(name)
        except StoreError as exc:  # e.g. one corrupt manifest: the rest of the catalogue still syncs
            logger.error("adapter store: skipping %s: %s", name, exc)
            return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="lorafold-catalogue", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _poll(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.sync()
            except StoreError as exc:
                # Keep serving the last known catalogue; say so once per outage, not every poll.
                if self.last_error != str(exc):
                    logger.error("adapter store unreachable, serving the last known catalogue: %s", exc)
                self.last_error = str(exc)

    # ---- internals (lock held) -----------------------------------------------------------------

    def _adopt(self, manifest: Manifest, etag: str) -> None:
        old = self._entries.get(manifest.name)
        self._entries[manifest.name] = (manifest, etag)
        self._misses.pop(manifest.name, None)
        if old is not None and old[0].content_hash != manifest.content_hash:
            self._release(old[0].content_hash)

    def _forget(self, name: str) -> None:
        old = self._entries.pop(name, None)
        if old is not None:
            self._release(old[0].content_hash)

    def _release(self, content_hash: str) -> None:
        if self.on_forget is not None and not any(m.content_hash == content_hash for m, _ in self._entries.values()):
            self.on_forget(content_hash)

