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
        # kernels/ itself has no __init__.py (see below): count every folder holding modules.
        for package_dir in {py.parent for py in (ROOT / folder).rglob("*.py")}:
            rel = package_dir.relative_to(ROOT / folder)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            assert dotted in listed, f"{dotted} missing from [tool.setuptools] packages in pyproject.toml"


def test_top_level_kernels_name_is_never_ours() -> None:
    # Run from the repository root, where `kernels/` is on sys.path, as a user would. Our
    # folder has no __init__.py, so it is at most a PEP 420 namespace portion: a regular
    # `kernels` package anywhere on the path (Hugging Face's, which transformers >= 5
    # imports at start) wins, and with none installed the name resolves to a namespace
    # without __file__, which transformers' probe counts as absent.
    code = (
        "import importlib.util, pathlib, sys\n"
        "import lorafold.kernels.ops\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "if spec is not None and spec.origin is not None:\n"
        "    assert root not in pathlib.Path(spec.origin).parents, spec.origin\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "if is_kernels_available():\n"
        "    import kernels\n"
        "    assert root not in pathlib.Path(kernels.__file__).parents, kernels.__file__\n"
        "import transformers; from transformers import LlamaForCausalLM\n"
    )
    _run_from_root(code)


def test_kernels_folder_alone_is_a_bare_namespace() -> None:
    # With no other `kernels` on the path (the repository root and the standard library
    # only), the name must not load any of our modules: no __file__, nothing inside.
    code = (
        "import sys; sys.path[:] = [sys.argv[1]] + [p for p in sys.path if 'site-packages' not in p and p]\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None, (\n"
        "    f'{kernels.__file__}: a kernels/__init__.py makes the repository root\\'s `kernels` a regular '\n"
        "    'package that shadows Hugging Face\\'s (transformers imports it at start); keep it a namespace')\n"
        "assert not hasattr(kernels, 'ops')\n"
    )
    _run_from_root(code)


def _run_from_root(code: str) -> None:
    """`python -c code ROOT` with the repository root as working directory (so on sys.path)."""
    subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, check=True)


def test_kernels_import_nothing_from_the_layers_above() -> None:
    """kernels/ is the bottom layer: server/ and training/ use it, never the other way round."""
    import ast

    root = Path(__file__).resolve().parents[1] / "kernels"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("lorafold.server", "lorafold.training")), f"{path.name} imports {name}"
