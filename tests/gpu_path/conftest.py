"""The GPU code path on the CPU: Triton's interpreter for the LoRA kernels unless a GPU is
present. The set-up is tests/kernels/conftest.py's (which explains it), imported, not copied."""

import tests.kernels.conftest  # noqa: F401  (sets TRITON_INTERPRET before the kernels load)
