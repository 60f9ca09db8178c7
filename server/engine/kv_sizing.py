"""The KV cache's size from free memory, measured once at start (as vLLM's
`--gpu-memory-utilization`), for servers that are not given `--kv-blocks`.

GPU: the engine may hold `gpu_memory_utilization` of the device's whole memory. Whatever is in
use when this runs (the loaded weights, the CUDA context, other processes) counts against that
share; the adapter budget and an estimate of one step's activations are set aside; the KV
cache gets the rest. CPU: RAM is shared with everything else on the host, so the cache takes
at most `CPU_KV_BYTES` (about what the fixed 1,024-block default held for SmolLM2) and a
quarter of the available RAM.
Neither ever takes more blocks than `max_num_seqs` full contexts can use.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from lorafold.server.engine import flashinfer_paged
from lorafold.server.engine.config import EngineConfig

logger = logging.getLogger(__name__)

CPU_KV_BYTES = 1 << 30
CPU_KV_FRACTION = 0.25
# CUDA context, cuBLAS workspaces, allocator fragmentation: not visible as tensors.
GPU_OVERHEAD_BYTES = 512 << 20


def kv_block_bytes(model_config: object, config: EngineConfig, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all layers: K and V, [block_size, kv_heads, head_dim] each."""
    heads = model_config.num_key_value_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_hidden_layers * config.block_size * heads * head_dim * itemsize


def activation_bytes(model_config: object, config: EngineConfig) -> int:
    """A generous estimate of one step's peak temporaries: float32 copies of the widest
    activations for every batched token (the LoRA ops accumulate in float32), the float32
    logits and sampling buffers of every sampling row, and one prefill chunk's attention
    scores over a whole context (eager FlexAttention materialises them)."""
    c = model_config
    tokens = config.max_num_batched_tokens
    widest = 4 * c.hidden_size + 3 * c.intermediate_size
    scores = config.max_prefill_chunk * c.num_attention_heads * config.max_model_len
    return 4 * (tokens * widest + 4 * config.max_num_seqs * c.vocab_size + 2 * scores)


def needed_blocks(config: EngineConfig) -> int:
    """Blocks for `max_num_seqs` contexts of `max_model_len` tokens: more are never used."""
    return config.max_num_seqs * math.ceil(config.max_model_len / config.block_size)


def measure_kv_blocks(hf_model: nn.Module, config: EngineConfig, adapter_budget_bytes: int) -> int:
    """Blocks that fit the memory left for the KV cache on the model's device (see module)."""
    param = next(hf_model.parameters())
    device, dtype = param.device, param.dtype
    per_block = kv_block_bytes(hf_model.config, config, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        in_use = total - free
        budget = (int(config.gpu_memory_utilization * total) - in_use - adapter_budget_bytes
                  - activation_bytes(hf_model.config, config) - GPU_OVERHEAD_BYTES
                  - (flashinfer_paged.WORKSPACE_BYTES if config.attention_backend == "flashinfer" else 0))
        where = (f"{config.gpu_memory_utilization:.2f} x {total / 2**30:.1f} GiB of {device}, "
                 f"{in_use / 2**30:.1f} GiB in use")
    else:
        from lorafold.server.engine.model_runner import available_memory

        budget = min(CPU_KV_BYTES, int(CPU_KV_FRACTION * available_memory(device)))
        where = "host RAM"
    blocks = min(budget // per_block, needed_blocks(config))
    one_context = math.ceil(config.max_model_len / config.block_size)
    if blocks < one_context:
        raise ValueError(
            f"the KV cache fits only {max(blocks, 0)} blocks of {config.block_size} tokens in {where} (adapter budget "
            f"{adapter_budget_bytes / 2**20:.0f} MiB set aside); one {config.max_model_len}-token context needs "
            f"{one_context}: raise --gpu-memory-utilization, lower --max-model-len / --adapter-budget-mb, "
            "or give --kv-blocks"
        )
    logger.info("KV cache sized from free memory (%s): %d blocks, %.0f MiB", where, blocks, blocks * per_block / 2**20)
    return int(blocks)


def with_measured_kv_blocks(hf_model: nn.Module, config: EngineConfig) -> EngineConfig:
    """`config` with `num_kv_blocks` measured on the model's device (call before the engine
    is built, with the model already there)."""
    from lorafold.server.engine.model_runner import adapter_budget_bytes

    device = next(hf_model.parameters()).device
    blocks = measure_kv_blocks(hf_model, config, adapter_budget_bytes(config, device))
    return dataclasses.replace(config, num_kv_blocks=blocks)
