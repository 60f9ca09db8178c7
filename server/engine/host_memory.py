"""Keep freed host memory in the process for reuse (glibc malloc), instead of returning it.

Every CPU forward allocates and frees the same large temporaries (the paged-KV gathers,
LoRA weight gathers, matmul outputs: 1-30 MB each, ~100 per decode step). glibc's malloc
hands the top of its heap back to the kernel whenever more than M_TRIM_THRESHOLD is free
and serves blocks over M_MMAP_THRESHOLD from fresh mmaps, so each step re-faults those
pages in, 4 KiB at a time, which can cost as much as the step's compute. A server holds its
peak working set anyway (as PyTorch's CUDA caching allocator does on a GPU), so we trim only
past 2 GiB and keep blocks up to glibc's largest mmap threshold on the heap.

A process-wide setting: `lorafold serve` applies it once at start (and the benchmarks of the
serving path do, to measure what the server runs); a library user who builds an engine in
their own process decides for their process.

Elsewhere (musl, macOS, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc accepts mmap thresholds up to 32 MiB on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
# mallopt takes an int: trim only when over 2 GiB are free at the heap top, far above any
# step's temporaries (a freed multi-GB adapter pool is still given back)
_TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Stop glibc returning freed heap memory to the kernel (idempotent). True when applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))
    _applied = ok
    if ok:
        logger.debug("glibc malloc: trim threshold %d B, mmap threshold %d B", _TRIM_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return ok
