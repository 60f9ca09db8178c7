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

from benchmarks._triton_offline import Offline, lora_launches

Key = tuple[str, tuple, tuple]


class TritonVariantLog:
    """`with TritonVariantLog() as log:` records `log.keys`, one per launch, in order."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self._launches = lora_launches(self._record, run=True)

    def _record(self, name: str, sm90: Offline, args: tuple, kwargs: dict) -> None:
        self.keys.append((name, *sm90.key(*args, **kwargs)))

    def __enter__(self) -> TritonVariantLog:
        self._launches.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._launches.__exit__(*exc)
