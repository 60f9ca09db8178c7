"""Packaging invariants: every sub-package is installed, and our `kernels/` never poses as HF's."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"server": "lorafold.server", "training": "lorafold.training", "kernels": "lorafold.kernels", "clients": "lorafold.clients"}


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for folder, name in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            assert dotted in listed, f"{dotted} missing from [tool.setuptools] packages in pyproject.toml"


def test_transformers_does_not_take_our_kernels_for_hf_kernels() -> None:
    # Run from the repository root, where `kernels/` is on sys.path, as a user would.
    code = (
        "import lorafold.kernels.ops\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available(), 'transformers believes HF kernels is installed'\n"
        "import transformers; from transformers import LlamaForCausalLM\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
