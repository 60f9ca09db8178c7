"""Base linear weights prepacked for oneDNN: the CPU serving path's frozen matmuls.

`F.linear` on CPU runs a BLAS sgemm on the plain row-major weight at every call, which is far
from the machine's matmul rate at serving batch sizes (8-256 rows). oneDNN can reorder a
weight once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
torch.compile's CPU backend does for frozen linears) and run every later call on it
(`_linear_pointwise`): the weight is re-laid out once instead of being read in a
matmul-unfriendly layout at every call (timings: docs/benchmarks.md, `bench_multi_lora_forward`).

Only for inference: the packed op has no autograd formula, so callers fall back to
`F.linear` whenever gradients are enabled (and for batches over `PACKED_MAX_ROWS` rows, where
the packed call stops winning). A packed weight is a snapshot: repack after
changing the dense weight. It costs one more copy of the weight in memory.
"""

from __future__ import annotations

import torch
from torch import nn

# The batch size oneDNN picks its packed layout for; one layout for 64 rows serves every size
# from 8 to 256 rows about as well as that size's own.
DEFAULT_BATCH_HINT = 64
# Above this many rows the packed call stops beating F.linear on SmolLM2's shapes, so bigger
# batches (long prefill chunks) take F.linear.
PACKED_MAX_ROWS = 256


def can_prepack(weight: torch.Tensor) -> bool:
    """fp32 CPU weights on a torch build with oneDNN and its packed-linear ops."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def prepack(weight: torch.Tensor, batch_hint: int = DEFAULT_BATCH_HINT) -> torch.Tensor:
    """A oneDNN-packed copy of `weight` [out, in] (check `can_prepack` first)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` on the packed weight; x [..., in] -> [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def use_packed(x: torch.Tensor) -> bool:
    """No gradients, a CPU input (the packed copy stays on the CPU if the module is moved), and
    a batch small enough for the packed call to win (`PACKED_MAX_ROWS`)."""
    return not torch.is_grad_enabled() and x.device.type == "cpu" and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` (kept, and used whenever gradients are on) plus its packed copy."""

    def __init__(self, linear: nn.Linear, batch_hint: int = DEFAULT_BATCH_HINT) -> None:
        super().__init__()
        self.linear = linear
        self.packed = prepack(linear.weight, batch_hint)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_packed(x):
            return packed_linear(x, self.packed, self.linear.bias)
        return self.linear(x)
