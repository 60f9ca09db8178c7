"""A log of what makes the host wait for the device, for code that must not (what a CUDA
graph captures; a decode step's host path). On the CPU these calls run silently, so the GPU
path's tests record them instead: aten ops through a TorchDispatchMode, and the Tensor
methods that read a tensor back without an aten op on the CPU."""

from __future__ import annotations

import sys
import threading
from types import FrameType

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device (a value read back; an output whose size depends
# on the data) or put Python data on it. Inside a CUDA-graph capture each one is an error (or
# a value baked into every replay); on the CPU they run silently, so only a log catches them.
HOST_SYNC_OPS = frozenset({
    "aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.equal.default",
    "aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
    "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor", "aten.lift_fresh.default",
    "aten.lift_fresh_copy.default",
})


# Tensor methods that copy to the host without an aten op on a CPU tensor (on CUDA: a sync).
HOST_READ_METHODS = ("tolist", "numpy", "cpu")


def _ours(frame: FrameType, *, tests: bool = False) -> bool:
    """Code of the package itself (by module name, wherever it is installed from; the tests'
    too if `tests`), not a library's (Triton's interpreter reads tensors back too)."""
    return frame.f_globals.get("__name__", "").startswith(("lorafold.", "tests.") if tests else "lorafold.")


class HostSyncLog(TorchDispatchMode):
    """Records every aten op run under it (`ops`) and, in `syncs` with the repo line that
    caused them, those of HOST_SYNC_OPS, indexing by a boolean mask (a nonzero inside the
    kernel) and calls of HOST_READ_METHODS made from the repo's code."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.syncs: list[str] = []
        self._saved: dict[str, object] = {}

    def _record(self, what: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and not _ours(frame):
            frame = frame.f_back
        where = f" at {frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else " at <outside lorafold>:0"
        self.syncs.append(what + where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops.add(name)
        indices = args[1] if name.startswith(("aten.index.", "aten.index_put")) and len(args) > 1 else ()
        if name in HOST_SYNC_OPS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            self._record(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        thread = threading.get_ident()
        for method in HOST_READ_METHODS:
            original = self._saved[method] = getattr(torch.Tensor, method)

            def logged(tensor, *args, _name=method, _original=original, **kwargs):
                # from the repo's code (not Triton's interpreter), on this thread (not the
                # adapter-staging worker's host tensors; dispatch modes are per thread too)
                if threading.get_ident() == thread and _ours(sys._getframe(1), tests=True):
                    self._record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, logged)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)
