"""Host-to-device copies of a step's small inputs (token ids, positions, metadata).

`torch.tensor(values, device="cuda")` copies from pageable memory and makes the host wait
for the GPU's queue to drain; a step that builds a dozen such tensors waits a dozen times.
The engine instead lays each step's values out on the host and moves them with this.
"""

from __future__ import annotations

import torch


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device` in one copy: from page-locked memory, asynchronous, on
    CUDA (PyTorch's pinned-memory cache keeps the block until the copy has run, so the
    host never waits); `host` itself on the CPU."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


# Bytes each part of a packed tensor starts on. Compiled kernels specialise on pointer
# alignment (Triton on 16-byte divisibility, Inductor assumes aligned inputs): a view at an
# odd offset would compile another variant on the serving thread, or be copied per call.
ALIGN_BYTES = 16


def aligned_spans(sizes: list[int], itemsize: int) -> tuple[list[slice], int]:
    """Where parts of these element counts go in one packed 1-D buffer, each starting a
    multiple of ALIGN_BYTES after the first: a slice per part, and the buffer's length."""
    per = max(1, ALIGN_BYTES // itemsize)
    spans, at = [], 0
    for n in sizes:
        spans.append(slice(at, at + n))
        at += n + -n % per
    return spans, at


def aligned_cat(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[slice]]:
    """`parts` (tensors of one dtype, flattened) one after another in one 1-D tensor laid out
    by `aligned_spans`; and the slice of each part in it."""
    spans, total = aligned_spans([p.numel() for p in parts], parts[0].element_size())
    packed = parts[0].new_zeros(total)
    for part, span in zip(parts, spans):
        packed[span] = part.reshape(-1)
    return packed, spans
