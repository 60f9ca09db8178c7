"""The adapter store: where every replica finds the catalogue and the weights.

Layout (the same in both backends):

    blobs/<content_hash>/adapter_config.json        weights, content-addressed, written once
    blobs/<content_hash>/adapter_model.safetensors
    manifests/<quoted name>.json                    one small JSON per name -> hash, config, ranks

`file:///path` keeps both on a local (or shared) file system: the embedded default, no other
service. `s3://bucket/prefix` keeps them in any S3-compatible object store (AWS S3, MinIO,
SeaweedFS), endpoint and credentials from the standard AWS environment variables.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from lorafold.server.store.base import (
    AdapterStore,
    Manifest,
    StoreAuthError,
    StoreConflictError,
    StoreError,
    StoreIntegrityError,
    StoreUnavailableError,
)

__all__ = [
    "AdapterStore", "Manifest", "StoreAuthError", "StoreConflictError", "StoreError", "StoreIntegrityError",
    "StoreUnavailableError", "open_store",
]


def open_store(url: str) -> AdapterStore:
    """The store behind `url`: `file:///abs/path`, a plain path, or `s3://bucket[/prefix]`."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ValueError(f"adapter store {url!r}: a file URL needs three slashes, e.g. file:///var/lib/lorafold")
        from lorafold.server.store.file import FileStore

        return FileStore(Path(unquote(parsed.path) if parsed.scheme else url).expanduser())
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"adapter store {url!r} names no bucket; use s3://BUCKET/PREFIX")
        from lorafold.server.store.s3 import S3Store

        return S3Store(parsed.netloc, parsed.path.strip("/"))
    raise ValueError(f"adapter store {url!r}: unsupported scheme {parsed.scheme!r}; use file:///PATH or s3://BUCKET/PREFIX")
