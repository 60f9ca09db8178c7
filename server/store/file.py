"""The file-system store: the embedded default (`file:///path`), one folder, no other service.

Compare-and-swap on a manifest holds an exclusive `flock` on `manifests/.lock` while it reads
the current ETag and renames the new file into place, so it is atomic between processes on
one host (and on file systems with working POSIX locks). The ETag is the sha256 of the
manifest's bytes, so it changes exactly when the content does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorafold.server.store.base import (
    AdapterStore,
    Manifest,
    StoreConflictError,
    StoreIntegrityError,
    StoreUnavailableError,
    blob_key,
    manifest_key,
    name_from_key,
    sha256_hex,
)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _etag(raw: bytes) -> str:
    return sha256_hex(raw)[:32]


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file + fsync + rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class FileStore(AdapterStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root.resolve()}"
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(f"adapter store {self.root}: cannot create it ({exc.strerror}); "
                                        "pass --adapter-store a writable folder") from exc

    def check(self) -> None:
        if not os.access(self.root / "manifests", os.W_OK):
            raise StoreUnavailableError(f"adapter store {self.root} is not writable by this process")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "manifests" / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def put_blob(self, content_hash: str, config: bytes, weights: bytes) -> None:
        # Always written (each file replaced atomically, weights last): the same hash means the
        # same bytes, so readers never see a mix, and re-registering repairs an altered blob.
        final = self.root / blob_key(content_hash, WEIGHTS_FILE).rsplit("/", 1)[0]
        final.mkdir(exist_ok=True)
        _write_atomic(final / CONFIG_FILE, config)
        _write_atomic(final / WEIGHTS_FILE, weights)

    def get_blob(self, content_hash: str) -> tuple[bytes, bytes]:
        try:
            return ((self.root / blob_key(content_hash, CONFIG_FILE)).read_bytes(),
                    (self.root / blob_key(content_hash, WEIGHTS_FILE)).read_bytes())
        except FileNotFoundError as exc:
            raise StoreIntegrityError(f"adapter store {self.root}: blob {content_hash[:16]}... is missing "
                                        f"({exc.filename}); re-register the adapter") from exc

    def _read_raw(self, name: str) -> bytes | None:
        try:
            return (self.root / manifest_key(name)).read_bytes()
        except FileNotFoundError:
            return None

    def read_manifest(self, name: str) -> tuple[Manifest, str] | None:
        raw = self._read_raw(name)
        return None if raw is None else (Manifest.from_bytes(raw, manifest_key(name)), _etag(raw))

    def write_manifest(self, manifest: Manifest, *, expect_etag: str | None) -> str:
        data = manifest.to_bytes()
        with self._locked():
            current = self._read_raw(manifest.name)
            if (None if current is None else _etag(current)) != expect_etag:
                raise StoreConflictError(f"adapter {manifest.name!r} was changed by another writer meanwhile; retry")
            _write_atomic(self.root / manifest_key(manifest.name), data)
        return _etag(data)

    def delete_manifest(self, name: str, *, expect_etag: str) -> None:
        with self._locked():
            current = self._read_raw(name)
            if current is None or _etag(current) != expect_etag:
                raise StoreConflictError(f"adapter {name!r} was changed by another writer meanwhile; retry")
            (self.root / manifest_key(name)).unlink()

    def list_manifests(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for path in (self.root / "manifests").glob("*.json"):
            name = name_from_key(f"manifests/{path.name}")
            if name is None:  # a hashed file name (manifest_key): the name is inside
                try:
                    name = json.loads(path.read_bytes())["name"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # deleted meanwhile, or not a manifest (read_manifest names it if asked)
            raw = self._read_raw(name)
            if raw is not None:  # None: deleted between the listing and the read
                out[name] = _etag(raw)
        return out
