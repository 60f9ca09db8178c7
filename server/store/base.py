"""What an adapter store offers (`AdapterStore`), the manifest it keeps per name, its errors.

A store holds two kinds of objects. Blobs are an adapter's two files under its content hash:
written once, never changed, so any replica may cache them forever. Manifests bind a name to
a hash; they change, and every change is a compare-and-swap on the manifest's ETag, so two
replicas writing one name at once never lose an update silently: the loser gets
`StoreConflictError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from urllib.parse import quote, unquote

logger = logging.getLogger(__name__)
MANIFEST_VERSION = 1
_HASH = re.compile(r"^[0-9a-f]{64}$")


class StoreError(RuntimeError):
    """The adapter store could not do what was asked; the message says what and how to fix it."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached (down, network, wrong endpoint)."""


class StoreAuthError(StoreError):
    """The store refused the credentials or the bucket does not exist."""


class StoreConflictError(StoreError):
    """A conditional write lost: another replica changed the manifest first."""


class StoreIntegrityError(StoreError):
    """An object in the store does not match its recorded hash (tampered or corrupt)."""


@dataclass(slots=True)
class Manifest:
    """One name's entry in the catalogue: which weights, and what they are."""

    name: str
    content_hash: str  # the adapter's content hash (peft_format.parse_adapter), the blob's key
    config_sha256: str  # sha256 of the stored adapter_config.json bytes
    weights_sha256: str  # sha256 of the stored adapter_model.safetensors bytes
    config: dict
    rank: int
    ranks: list[int]
    targets: list[str]
    size_bytes: int
    registered_at: float
    source: str = ""
    version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, key: str) -> Manifest:
        try:
            data = json.loads(raw.decode("utf-8"))
            # Fields a newer writer added are ignored (replicas of two versions share a store
            # during a rolling upgrade); a missing required field is an error.
            manifest = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise StoreIntegrityError(f"manifest {key} is not a valid lorafold manifest ({exc}); "
                                      "re-register the adapter or delete the object") from exc
        for label in ("content_hash", "config_sha256", "weights_sha256"):
            if not isinstance(getattr(manifest, label), str) or not _HASH.match(getattr(manifest, label)):
                raise StoreIntegrityError(f"manifest {key}: {label} is not a sha256 hex digest")
        return manifest


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_key(name: str) -> str:
    """Names may hold '/': quoted, every manifest is one flat key under manifests/. Where the
    quoted name would pass 200 bytes (a 128-character name of '/' quotes to 384; file systems
    and some S3 servers cap one path component at 255) the key is the name's sha256 instead,
    and the name is read from the manifest itself (`name_from_key` returns None for it)."""
    quoted = quote(name, safe="")
    return f"manifests/{quoted}.json" if len(quoted) <= 200 else f"manifests/h-{sha256_hex(name.encode())}.json"


def name_from_key(key: str) -> str | None:
    tail = key.rsplit("manifests/", 1)[-1]
    if not tail.endswith(".json") or "/" in tail or tail.startswith("h-"):
        return None
    return unquote(tail[: -len(".json")])


def blob_key(content_hash: str, filename: str) -> str:
    if not _HASH.match(content_hash):
        raise ValueError(f"content hash {content_hash!r} is not a sha256 hex digest")
    return f"blobs/{content_hash}/{filename}"


def verify_blob(manifest: Manifest, config: bytes, weights: bytes) -> None:
    """Refuse blob bytes that are not the ones the manifest recorded (before anything parses them)."""
    for label, data, want in (("adapter_config.json", config, manifest.config_sha256),
                              ("adapter_model.safetensors", weights, manifest.weights_sha256)):
        got = sha256_hex(data)
        if got != want:
            raise StoreIntegrityError(
                f"adapter {manifest.name!r}: {blob_key(manifest.content_hash, label)} in the store has sha256 "
                f"{got[:16]}..., its manifest says {want[:16]}...; the object was altered: re-register the adapter"
            )


class AdapterStore(ABC):
    """Blobs (immutable, content-addressed) and manifests (compare-and-swap on an ETag)."""

    url: str

    @abstractmethod
    def check(self) -> None:
        """Raise StoreError naming the fix if the store is unreachable or refuses us."""

    @abstractmethod
    def put_blob(self, content_hash: str, config: bytes, weights: bytes) -> None:
        """Store an adapter's files under its hash (idempotent: same hash, same bytes; always
        written, so registering again repairs an altered copy)."""

    @abstractmethod
    def get_blob(self, content_hash: str) -> tuple[bytes, bytes]:
        """(config bytes, weights bytes); unverified: callers check them with `verify_blob`."""

    @abstractmethod
    def read_manifest(self, name: str) -> tuple[Manifest, str] | None:
        """(manifest, etag), or None when the name is not registered."""

    @abstractmethod
    def write_manifest(self, manifest: Manifest, *, expect_etag: str | None) -> str:
        """Write iff the current ETag is `expect_etag` (None: iff no manifest exists); new ETag.
        Raises StoreConflictError when another writer got there first."""

    @abstractmethod
    def delete_manifest(self, name: str, *, expect_etag: str) -> None:
        """Delete iff the current ETag is `expect_etag` (StoreConflictError otherwise)."""

    @abstractmethod
    def list_manifests(self) -> dict[str, str]:
        """name -> ETag of every manifest: what a replica polls to see others' changes."""


def wait_until_reachable(store: AdapterStore, patience_s: float = 30.0) -> None:
    """`store.check()`, retried while the store is merely unreachable (it may be starting
    beside this replica, as in compose or a fresh cluster) for up to `patience_s`; refused
    credentials or a missing bucket fail at once."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            store.check()
            return
        except StoreUnavailableError as exc:
            if time.monotonic() >= deadline:
                raise
            logger.warning("adapter store not reachable yet, retrying for up to %.0f s: %s", patience_s, exc)
            time.sleep(1.0)
