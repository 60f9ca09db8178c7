"""Triton kernels compiled for an H100 (sm_90) on a machine without a GPU.

Triton's wheel carries its NVIDIA backend and `ptxas`: the whole pipeline (TTIR, TTGIR, LLVM
IR, PTX, cubin) runs without a driver. What it yields is what a GPU would run: whether a
variant compiles at all (the interpreter accepts more), its registers, its spills (local
memory), its shared memory and its instructions (tensor-core `HMMA`/`HGMMA` or plain `FFMA`).
Timings still need a GPU. The variant's key comes from Triton's own binder, as at a launch
(`Offline.key` works under TRITON_INTERPRET=1 too; `Offline.compile` does not).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from lorafold.kernels import triton_lora

SM90 = GPUTarget("cuda", 90, 32)
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Instructions worth counting in the SASS: tensor-core MMAs (Hopper's warpgroup HGMMA, the
# warp-level HMMA), scalar fp32 FMAs, and local-memory traffic (spills).
OPCODES = ("HGMMA", "HMMA", "FFMA", "LDL", "STL")


@dataclass(frozen=True)
class Offline:
    """One kernel (a `triton.jit` function, interpreted or not) for one target."""

    jitted: JITFunction
    binder: Callable[..., tuple]
    backend: Any
    target: GPUTarget

    def key(self, *args: object, **kwargs: object) -> tuple:
        """The variant key Triton compiles for this launch: (specialization, options)."""
        _, specialization, options = self.binder(*args, **kwargs)
        return tuple(specialization), tuple(sorted(options.items()))

    def compile(self, *args: object, **kwargs: object) -> dict:
        """Compile the variant this launch would use; its resources and SASS instruction counts.
        Not under TRITON_INTERPRET=1: the interpreter replaces triton.language's code
        generation in the whole process (keys still work there)."""
        if triton.knobs.runtime.interpret:
            raise RuntimeError("compiling for a GPU target needs a process without TRITON_INTERPRET=1")
        bound, specialization, options = self.binder(*args, **kwargs)
        opts, signature, constexprs, attrs = self.jitted._pack_args(self.backend, options, bound, specialization,
                                                                     options)
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(self.jitted, signature, constexprs, attrs), target=self.target,
                                  options=opts.__dict__)
        seconds = time.perf_counter() - t0
        return {**resources(compiled.asm["cubin"]), "shared_bytes": compiled.metadata.shared,
                "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
                "compile_s": round(seconds, 2)}


def offline(kernel: Any, do_not_specialize: Sequence[str] = (), target: GPUTarget = SM90) -> Offline:
    """`kernel` (the object `triton.jit` returned) for `target`; `do_not_specialize` as given
    to the decorator (an interpreted kernel does not keep it)."""
    jitted = JITFunction(kernel.fn, do_not_specialize=list(do_not_specialize))
    backend = make_backend(target)
    return Offline(jitted, create_function_from_signature(jitted.signature, jitted.params, backend), backend, target)


def resources(cubin: bytes) -> dict:
    """Registers, local (spill) bytes and SASS opcode counts of a cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _tool("cuobjdump", "--dump-resource-usage", f.name)
        sass = _tool("cuobjdump", "-sass", f.name)
    fields = dict(re.findall(r"(REG|LOCAL|STACK):(\d+)", usage))
    counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in OPCODES}
    return {"registers": int(fields.get("REG", 0)), "local_bytes": int(fields.get("LOCAL", 0)),
            "stack_bytes": int(fields.get("STACK", 0)), **{f"sass_{op}": n for op, n in counts.items()}}


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(_TOOLS, name), *args], capture_output=True, text=True, check=True).stdout


# The multi-LoRA kernels: name -> (their attribute in triton_lora, the `do_not_specialize`
# list their decorator got)
LORA_KERNELS = {"shrink": ("_shrink_kernel", triton_lora._STEP_INTS_SHRINK),
                "expand": ("_expand_kernel", triton_lora._STEP_INTS_EXPAND)}
OnLaunch = Callable[[str, Offline, tuple, dict], None]


class _StandIn:
    """Takes a kernel's place: `kernel[grid](*args, **kwargs)` calls on_launch(name, the
    kernel for sm_90, args, kwargs), then launches the real one if `run`."""

    def __init__(self, name: str, kernel: Any, sm90: Offline, on_launch: OnLaunch, run: bool) -> None:
        self.name, self.kernel, self.sm90, self.on_launch, self.run = name, kernel, sm90, on_launch, run

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        def launch(*args: object, **kwargs: object) -> None:
            self.on_launch(self.name, self.sm90, args, kwargs)
            if self.run:
                self.kernel[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def lora_launches(on_launch: OnLaunch, *, run: bool) -> Iterator[None]:
    """Within it, every launch of the LoRA kernels goes through `on_launch` first (and is
    then run, or not)."""
    saved = {attr: getattr(triton_lora, attr) for attr, _ in LORA_KERNELS.values()}
    try:
        for name, (attr, step_ints) in LORA_KERNELS.items():
            kernel = saved[attr]
            setattr(triton_lora, attr, _StandIn(name, kernel, offline(kernel, step_ints), on_launch, run))
        yield
    finally:
        for attr, kernel in saved.items():
            setattr(triton_lora, attr, kernel)
