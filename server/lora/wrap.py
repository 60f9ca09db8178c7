"""Turn a transformers Llama-family model into a multi-adapter model, in place."""

from __future__ import annotations

from torch import nn

from lorafold.server.lora.layers import MultiLoRALinear
from lorafold.server.lora.slots import AdapterSlots, Target
from lorafold.server.models.loader import LLAMA_TARGETS


def wrap_linears(
    model: nn.Module,
    *,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    num_slots: int = 8,
    rows: int = 256,
) -> AdapterSlots:
    """Replace every `nn.Linear` named in `targets` by a `MultiLoRALinear` sharing its weights.

    The base weights are reused, not copied. Returns the slots through which adapters are
    filled and cleared; forwards take per-token slots via `server.lora.context.lora_batch`.
    """
    found: dict[str, Target] = {}
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, nn.Linear):
            layer = MultiLoRALinear(module, [module.out_features], num_slots, rows)
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, leaf, layer)
            found[path] = Target(layer=layer, slice_idx=0)
    if not found:
        raise ValueError(f"no linear layer named any of {targets} in {type(model).__name__}")
    return AdapterSlots(found, num_slots=num_slots, rows=rows)
