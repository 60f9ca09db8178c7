"""The GPU code path on the CPU: Triton's interpreter for the LoRA kernels unless a GPU is
present (the same set-up as tests/kernels/conftest.py, which explains it).

`triton.jit` picks interpreted or compiled kernels when the decorated module is imported
(triton 3.x reads TRITON_INTERPRET live through `triton.knobs`), so the variable must be set
before `lorafold.kernels.triton_lora` is first imported in the process. pytest imports this
conftest before collecting the test modules of this folder. If a test module elsewhere in
tests/ imported the kernels earlier in compiled mode, the module is re-imported here so its
kernels match the mode (its `INTERPRET` flag records the mode it was built in). That works
even when triton itself was imported earlier in compiled mode (importing a transformers model
does so) because the kernels call only Triton builtins, no @jit helpers of triton.language.

Keep tests/__init__.py next to tests/kernels/__init__.py: without it pytest would import this
folder as a top-level package named `kernels`, the name transformers probes for Hugging Face's
`kernels` package.
"""

import importlib
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (after the environment is set)

_loaded = sys.modules.get("lorafold.kernels.triton_lora")
if _loaded is not None and _loaded.INTERPRET != bool(triton.knobs.runtime.interpret):
    importlib.reload(_loaded)
