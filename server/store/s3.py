"""The S3 store (`s3://bucket/prefix`): AWS S3, MinIO, SeaweedFS, any S3-compatible service.

boto3 reads the endpoint and credentials from the standard AWS environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), so a
Kubernetes Secret or a compose file configures it without lorafold-specific variables.

Compare-and-swap uses S3's conditional writes: `PutObject` with `IfNoneMatch="*"` (create
only) or `IfMatch=<etag>` (replace only that version), and `DeleteObject` with `IfMatch`.
A lost race is answered 412 PreconditionFailed (or 409 ConditionalRequestConflict).
"""

from __future__ import annotations

import logging
import os

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from lorafold.server.store.base import (
    AdapterStore,
    Manifest,
    StoreAuthError,
    StoreConflictError,
    StoreIntegrityError,
    StoreUnavailableError,
    blob_key,
    manifest_key,
    name_from_key,
)
from lorafold.server.store.file import CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)
_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403"}
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class _NotFound(Exception):
    pass


class S3Store(AdapterStore):
    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}"
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # Custom endpoints (MinIO, SeaweedFS) rarely resolve virtual-hosted bucket names: path style.
        # Short timeouts and one retry: a request waiting on a cold adapter should fail in seconds.
        config = Config(connect_timeout=2, read_timeout=15, retries={"max_attempts": 2, "mode": "standard"},
                        s3={"addressing_style": "path" if self.endpoint else "auto"})
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name=region, config=config)

    # ---- error translation ---------------------------------------------------------------

    def _call(self, what: str, fn, **kwargs):
        where = f"{self.url} (endpoint {self.endpoint or 'AWS default'})"
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except NoCredentialsError as exc:
            raise StoreAuthError(f"adapter store {where}: no credentials; set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY") from exc
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _MISSING or (status == "404" and code != "NoSuchBucket"):
                raise _NotFound(what) from exc
            if code in _CONFLICT or status in ("412",):
                raise StoreConflictError(f"{what}: another replica changed it meanwhile; retry") from exc
            if code in _AUTH or status == "403":
                raise StoreAuthError(f"adapter store {where} refused the credentials for {what} ({code}); "
                                     "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from exc
            if code == "NoSuchBucket":
                raise StoreAuthError(f"adapter store {where}: bucket {self.bucket!r} does not exist; create it") from exc
            raise StoreUnavailableError(f"adapter store {where}: {what} failed: {code} {err.get('Message', '')}") from exc
        except BotoCoreError as exc:  # connection refused, timeouts, DNS
            raise StoreUnavailableError(f"adapter store {where} is unreachable ({what}): {exc}; "
                                        "check AWS_ENDPOINT_URL and that the store is running") from exc

    def _key(self, key: str) -> str:
        return self.prefix + key

    # ---- the AdapterStore interface ------------------------------------------------------

    def check(self) -> None:
        self._call("listing the bucket", self.client.list_objects_v2, Prefix=self._key("manifests/"), MaxKeys=1)

    def put_blob(self, content_hash: str, config: bytes, weights: bytes) -> None:
        # Always uploaded: the same hash means the same bytes (each PUT is atomic), and a
        # re-registration then repairs an altered object.
        for name, data in ((CONFIG_FILE, config), (WEIGHTS_FILE, weights)):
            self._call(f"upload of {name}", self.client.put_object, Key=self._key(blob_key(content_hash, name)), Body=data)

    def _get(self, key: str, what: str) -> tuple[bytes, str]:
        resp = self._call(what, self.client.get_object, Key=self._key(key))
        try:
            return resp["Body"].read(), resp["ETag"]
        except BotoCoreError as exc:
            raise StoreUnavailableError(f"adapter store {self.url}: reading {what} failed: {exc}") from exc

    def get_blob(self, content_hash: str) -> tuple[bytes, bytes]:
        try:
            return tuple(self._get(blob_key(content_hash, n), f"blob {content_hash[:16]}.../{n}")[0]
                         for n in (CONFIG_FILE, WEIGHTS_FILE))  # type: ignore[return-value]
        except _NotFound as exc:
            raise StoreIntegrityError(f"adapter store {self.url}: blob {content_hash[:16]}... is missing; "
                             "re-register the adapter") from exc

    def read_manifest(self, name: str) -> tuple[Manifest, str] | None:
        key = manifest_key(name)
        try:
            raw, etag = self._get(key, f"manifest of {name!r}")
        except _NotFound:
            return None
        return Manifest.from_bytes(raw, key), etag

    def write_manifest(self, manifest: Manifest, *, expect_etag: str | None) -> str:
        cond = {"IfNoneMatch": "*"} if expect_etag is None else {"IfMatch": expect_etag}
        try:
            resp = self._call(f"adapter {manifest.name!r}", self.client.put_object, Key=self._key(manifest_key(manifest.name)),
                              Body=manifest.to_bytes(), ContentType="application/json", **cond)
        except _NotFound as exc:  # IfMatch on a manifest deleted meanwhile
            raise StoreConflictError(f"adapter {manifest.name!r} was deleted by another replica meanwhile; retry") from exc
        return resp["ETag"]

    def delete_manifest(self, name: str, *, expect_etag: str) -> None:
        try:
            self._call(f"adapter {name!r}", self.client.delete_object, Key=self._key(manifest_key(name)), IfMatch=expect_etag)
        except _NotFound as exc:
            raise StoreConflictError(f"adapter {name!r} was deleted by another replica meanwhile") from exc

    def _name_inside(self, key: str) -> str | None:
        try:
            raw, _ = self._get(key, f"manifest {key}")
            return Manifest.from_bytes(raw, key).name
        except (_NotFound, StoreIntegrityError):  # deleted meanwhile, or not a manifest; an outage propagates
            return None

    def list_manifests(self) -> dict[str, str]:
        out: dict[str, str] = {}
        token = None
        while True:
            kwargs = {"Prefix": self._key("manifests/")} | ({"ContinuationToken": token} if token else {})
            page = self._call("listing the manifests", self.client.list_objects_v2, **kwargs)
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix):]
                name = name_from_key(key)
                if name is None and key.endswith(".json"):  # a hashed key (manifest_key): the name is inside
                    name = self._name_inside(key)
                if name is not None:
                    out[name] = obj["ETag"]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]
