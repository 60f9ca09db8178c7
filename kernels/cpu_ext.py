"""Build (once) and load the compiled CPU serving kernels of `kernels/csrc/cpu_ops.cpp`.

The ops register as `torch.ops.lorafold_cpu.*`. The shared library is built on first use
with torch's C++ extension builder (gcc + ninja) into a folder keyed by the source,
the torch version and the compiler flags, under `$LORAFOLD_CACHE/cpu_kernels` (default
~/.cache/lorafold), and loaded from there afterwards without any compiler: a container can
ship it prebuilt (`python -m lorafold.kernels.cpu_ext` builds it and prints where).

When the library cannot be built or loaded (no compiler, an unsupported platform), or
`LORAFOLD_CPU_KERNELS=0` is set, `available()` is False and callers keep the pure-torch path;
the reason is logged once. `LORAFOLD_CPU_MARCH` (default `native`) is the gcc `-march`: set
it to a portable level (`x86-64-v3`) when the library is built on one machine for others.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "cpu_ops.cpp",)
HEADERS = (CSRC / "simd.h",)
_NAME = "lorafold_cpu_ops"
# -fopenmp: at::parallel_for is a header template over `omp parallel`; without the flag it
# compiles to a serial loop. torch's wheels bundle their libgomp under the same soname
# (libgomp.so.1), which the loader has already mapped, so the ops share torch's one OpenMP
# thread pool. No -ffast-math: the attention softmax relies on -inf.
_BASE_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-std=c++17")

_lock = threading.Lock()
_loaded: bool | None = None


def enabled() -> bool:
    """False when LORAFOLD_CPU_KERNELS=0 (or off/false/no) asks for the pure-torch path."""
    return os.environ.get("LORAFOLD_CPU_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")


def _flags() -> list[str]:
    march = os.environ.get("LORAFOLD_CPU_MARCH", "native").strip()
    return [*_BASE_FLAGS, f"-march={march}"] if march else list(_BASE_FLAGS)


def build_dir() -> Path:
    """Folder of the library for this source, torch version, flags and machine type."""
    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.read_bytes())
    key.update(f"{torch.__version__}|{' '.join(_flags())}|{platform.machine()}|{sys.version_info[:2]}".encode())
    return _cache_root() / "cpu_kernels" / key.hexdigest()[:16]


def library_path() -> Path:
    return build_dir() / f"{_NAME}.so"


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the PyPI wheel (a dependency) puts it next to
    the interpreter, which is not on PATH when a venv's python is run without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # cpp_extension then reports that ninja is missing
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _build(folder: Path) -> None:
    from torch.utils import cpp_extension  # imported lazily: it pulls in setuptools

    _put_ninja_on_path()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=_NAME,
        sources=[str(p) for p in SOURCES],
        extra_cflags=_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )


def available() -> bool:
    """Load the kernels (building them the first time); False, with the reason logged once,
    where they cannot be. Thread-safe; the answer is cached for the process."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        _loaded = _load()
        return _loaded


def _load() -> bool:
    if not enabled():
        logger.info("compiled CPU kernels disabled by LORAFOLD_CPU_KERNELS; using the torch path")
        return False
    if platform.system() != "Linux":
        logger.info("compiled CPU kernels are built on Linux only; using the torch path")
        return False
    path = library_path()
    try:
        if path.exists():
            torch.ops.load_library(str(path))
        else:
            logger.info("building the CPU kernels into %s (once; compiling takes a while)", path.parent)
            _build(path.parent)  # cpp_extension.load also loads the library it built
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as err:
        logger.warning("compiled CPU kernels unavailable (%s); using the slower torch path", err)
        return False
    return hasattr(torch.ops.lorafold_cpu, "lora_apply")


def _cache_root() -> Path:
    # The same LORAFOLD_CACHE as lorafold.server.models.assets.cache_root, read here rather than
    # imported: kernels/ is the bottom layer and imports nothing from server/ or training/.
    return Path(os.environ.get("LORAFOLD_CACHE", Path.home() / ".cache" / "lorafold")).expanduser()


def main() -> int:
    """Build the kernels now (for images and setup scripts); exit status 1 if they cannot be."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not available():
        return 1
    sys.stdout.write(f"{library_path()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
