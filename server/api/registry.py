"""The adapter registry: names -> validated PEFT adapters, persisted, with a CPU cache tier.

Tiers: device slots (the engine) <- CPU cache (this class, LRU under a byte budget) <- disk
(a content-addressed copy of every registered adapter in the state directory). Registered
weights are copied, so what is served is exactly what was validated, whatever later
happens to the source folder, and registrations survive restarts.

Thread-safe: registration and cold loads run in worker threads (never on the event loop).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafold.server.lora.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    AdapterFileOutsideRootError,
    LoRAAdapter,
    ModuleSpec,
    load_adapter,
    parse_adapter,
    read_adapter_files,
)

logger = logging.getLogger(__name__)
STATE_FILE = "registry.json"


class PathNotAllowedError(AdapterError):
    """An adapter path (or a file in it) outside the configured adapter root."""


@dataclass(slots=True)
class Registration:
    name: str
    content_hash: str
    folder: str  # the stored copy
    source: str
    registered_at: float
    rank: int
    ranks: list[int]
    targets: list[str]
    size_bytes: int
    requests_served: int = 0
    last_used: float | None = None


@dataclass(slots=True)
class TierStats:
    cpu_hits: int = 0
    cpu_misses: int = 0
    cpu_evictions: int = 0
    disk_loads: int = 0
    load_seconds: list[float] = field(default_factory=list)  # drained by the metrics


def _adapter_bytes(adapter: LoRAAdapter) -> int:
    return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in adapter.modules.values())


class AdapterRegistry:
    def __init__(
        self,
        state_dir: Path,
        adapter_root: Path,
        base_modules: Mapping[str, ModuleSpec],
        *,
        max_rank: int | None = None,
        cpu_cache_bytes: int = 1 << 30,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.adapter_root = Path(adapter_root)
        self.base_modules = dict(base_modules)
        self.max_rank = max_rank
        self.cpu_cache_bytes = cpu_cache_bytes
        self.stats = TierStats()
        self._lock = threading.RLock()
        self._entries: dict[str, Registration] = {}
        self._cache: OrderedDict[str, LoRAAdapter] = OrderedDict()  # content hash -> weights
        self._cache_bytes = 0
        (self.state_dir / "adapters").mkdir(parents=True, exist_ok=True)

    # ---- persistence ---------------------------------------------------------------------

    def restore(self) -> list[str]:
        """Reload registrations saved by an earlier run; returns the names restored."""
        path = self.state_dir / STATE_FILE
        if not path.exists():
            return []
        try:
            raw = json.loads(path.read_text())
            entries = [Registration(**e) for e in raw.get("adapters", [])]
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            backup = path.with_suffix(f".corrupt-{int(time.time())}")
            path.replace(backup)
            logger.error("registry state %s is unreadable (%s); moved aside to %s", path, exc, backup)
            return []
        restored = []
        with self._lock:
            for e in entries:
                if (Path(e.folder) / WEIGHTS_NAME).exists():
                    self._entries[e.name] = e
                    restored.append(e.name)
                else:
                    logger.error("adapter %s: stored weights %s are gone; dropping it", e.name, e.folder)
        return restored

    def _save(self) -> None:
        """Write the state atomically (temp file + rename): a crash never leaves half a file."""
        payload = {"version": 1, "adapters": [asdict(e) for e in self._entries.values()]}
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".registry-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_dir / STATE_FILE)

    def flush(self) -> None:
        with self._lock:
            self._save()

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
        stored = self.state_dir / "adapters" / adapter.content_hash
        if not (stored / WEIGHTS_NAME).exists():
            tmp = Path(tempfile.mkdtemp(dir=self.state_dir / "adapters", prefix=".incoming-"))
            (tmp / CONFIG_NAME).write_bytes(config_raw)
            (tmp / WEIGHTS_NAME).write_bytes(weights_raw)
            try:
                tmp.rename(stored)
            except OSError:  # a concurrent registration of the same weights won the race
                shutil.rmtree(tmp, ignore_errors=True)
        entry = Registration(
            name=name, content_hash=adapter.content_hash, folder=str(stored), source=source,
            registered_at=time.time(), rank=adapter.max_rank, ranks=sorted(adapter.ranks),
            targets=list(adapter.target_names), size_bytes=adapter.nbytes,
        )
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = entry
            self._save()
            self._put_cache(adapter)
            if old is not None and old.content_hash != entry.content_hash:
                self._drop_unreferenced(old)
        logger.info("registered adapter %s (rank %d, %s)", name, entry.rank, entry.content_hash[:12])
        return entry

    def delete(self, name: str) -> Registration | None:
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None:
                self._save()
                self._drop_unreferenced(entry)
        return entry

    def _drop_unreferenced(self, entry: Registration) -> None:
        """Forget weights no registration uses any more (requests in flight hold their own copy)."""
        if any(e.content_hash == entry.content_hash for e in self._entries.values()):
            return
        cached = self._cache.pop(entry.content_hash, None)
        if cached is not None:
            self._cache_bytes -= _adapter_bytes(cached)
        shutil.rmtree(entry.folder, ignore_errors=True)

    # ---- lookups -------------------------------------------------------------------------

    def get(self, name: str) -> Registration | None:
        with self._lock:
            return self._entries.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[Registration]:
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)]

    def in_cpu_cache(self, content_hash: str) -> bool:
        with self._lock:
            return content_hash in self._cache

    def record_use(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.requests_served += 1
                entry.last_used = time.time()

    # ---- the CPU tier --------------------------------------------------------------------

    def load(self, name: str) -> tuple[Registration, LoRAAdapter]:
        """The adapter's weights, from the CPU cache or (blocking) from disk."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise KeyError(name)
            cached = self._cache.get(entry.content_hash)
            if cached is not None:
                self._cache.move_to_end(entry.content_hash)
                self.stats.cpu_hits += 1
                return entry, cached
            self.stats.cpu_misses += 1
        t0 = time.perf_counter()
        adapter = load_adapter(entry.folder, self.base_modules, max_rank=self.max_rank)
        with self._lock:
            self.stats.disk_loads += 1
            self.stats.load_seconds.append(time.perf_counter() - t0)
            self._put_cache(adapter)
        return entry, adapter

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

    @property
    def cpu_resident(self) -> int:
        with self._lock:
            return len(self._cache)
