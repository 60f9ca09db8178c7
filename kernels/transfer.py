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
