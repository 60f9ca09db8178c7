"""Which compiled variants of the Triton LoRA kernels a GPU would need, found on the CPU.

Triton compiles a kernel once per distinct key: the specialization of its arguments (each
pointer's dtype and 16-byte alignment; each integer's width, divisibility by 16 and whether it
is 1, except the `do_not_specialize` ones; every constexpr's value) plus the launch options
(num_warps, ...). A launch whose key is new compiles on the spot: on the serving thread, a
stall of every request in flight. Under TRITON_INTERPRET=1 nothing compiles, so
`TritonVariantLog` asks Triton's own binder (`create_function_from_signature`, what
`JITFunction.run` calls first; `benchmarks/_triton_offline.py`) for the key each launch would
have on an H100 (sm_90) and records it; a test then compares the keys serving needs with
those the warm-up made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks._triton_offline import Offline, offline
from lorafold.kernels import triton_lora

KERNELS = {"shrink": ("_shrink_kernel", triton_lora._STEP_INTS_SHRINK),
           "expand": ("_expand_kernel", triton_lora._STEP_INTS_EXPAND)}
Key = tuple[str, tuple, tuple]


class _Recording:
    """Stands in for a kernel object: `kernel[grid](...)` records the key, then launches."""

    def __init__(self, name: str, kernel: Any, sm90: Offline, keys: list[Key]) -> None:
        self.name, self.kernel, self.sm90, self.keys = name, kernel, sm90, keys

    def __getitem__(self, grid: tuple) -> Callable[..., object]:
        def launch(*args: object, **kwargs: object) -> object:
            self.keys.append((self.name, *self.sm90.key(*args, **kwargs)))
            return self.kernel[grid](*args, **kwargs)

        return launch


class TritonVariantLog:
    """`with TritonVariantLog() as log:` records `log.keys`, one per launch, in order."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> TritonVariantLog:
        for name, (attr, step_ints) in KERNELS.items():
            kernel = getattr(triton_lora, attr)
            self._saved[attr] = kernel
            setattr(triton_lora, attr, _Recording(name, kernel, offline(kernel, step_ints), self.keys))
        return self

    def __exit__(self, *exc: object) -> None:
        for attr, kernel in self._saved.items():
            setattr(triton_lora, attr, kernel)
