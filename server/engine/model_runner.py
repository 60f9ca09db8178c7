"""The model runner: owns every tensor of the engine (weights, adapter pools, KV cache).

It turns one scheduler step (prefill chunks and decode tokens of many sequences, each with
its own adapter slot) into a single flat forward over the paged KV cache and returns the
logits of the rows that sample. The scheduler and its bookkeeping never see a tensor.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from lorafold.kernels import cpu_ext
from lorafold.kernels.transfer import host_to_device
from lorafold.server.engine.attention import build_attention_metadata
from lorafold.server.engine.block_manager import slot_mapping
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine import flashinfer_paged
from lorafold.server.engine.decode_graphs import DecodeGraphs
from lorafold.server.engine.flex_paged import check_block_size
from lorafold.server.engine.llama import LeanLlama
from lorafold.server.engine.scheduler import ScheduledChunk
from lorafold.server.lora.peft_format import LoRAAdapter, ModuleSpec
from lorafold.server.lora.slots import StagedAdapter
from lorafold.server.models.loader import DTYPES, module_specs

logger = logging.getLogger(__name__)

# Slot ids when only the memory budget limits the adapters (no max_loras): per-slot state is a
# few ints per layer, so this only bounds bookkeeping; the budget binds long before for any
# adapter of rank >= budget_rows / MAX_SLOTS.
MAX_SLOTS = 4096


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations: the device's free memory (CUDA), else the host's
    available RAM (/proc/meminfo MemAvailable, which counts reclaimable page cache)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_lora_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The adapter pools' dtype: "auto" is the model's (EngineConfig.lora_dtype), else the
    named one (the model dtypes' names, `loader.DTYPES`)."""
    return model_dtype if name == "auto" else DTYPES[name]


def adapter_row_bytes(hf_model: nn.Module, lora_dtype: str = "auto") -> int:
    """Bytes of one rank row in every LoRA pool: sum of (in + out) over the target linears,
    in the pools' dtype."""
    itemsize = resolve_lora_dtype(lora_dtype, next(hf_model.parameters()).dtype).itemsize
    return sum(spec.in_features + spec.out_features for spec in module_specs(hf_model).values()) * itemsize


def adapter_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    """The adapter memory budget: the configured bytes, else a fraction of free memory."""
    if config.adapter_budget_bytes is not None:
        return config.adapter_budget_bytes
    return int(available_memory(device) * config.adapter_memory_fraction)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """"auto": "flex" on CUDA (paged FlexAttention), "sdpa" elsewhere (see EngineConfig)."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return name


def resolve_decode_graphs(config: EngineConfig, device: torch.device, attention_backend: str, lora_backend: str) -> str:
    """"capture" (CUDA graphs), "eager" (the same buffers, no capture: CPU tests) or "off".
    The buffer path needs FlexAttention and the Triton LoRA kernels (no host-side LoRA work)."""
    gpu_path = attention_backend == "flex" and lora_backend == "triton"
    if config.decode_graphs == "off" or not gpu_path:
        if config.decode_graphs == "eager":
            raise ValueError("decode_graphs='eager' needs attention_backend='flex' and the Triton LoRA kernels "
                             "(lora_backend='triton', or 'auto' on CUDA)")
        return "off"
    if config.decode_graphs == "auto":
        return "capture" if device.type == "cuda" else "off"
    if config.decode_graphs == "capture" and device.type != "cuda":
        raise ValueError(f"decode_graphs='capture' needs a CUDA device, the model is on {device}; use 'eager' or 'auto'")
    return config.decode_graphs


class ModelRunner:
    def __init__(self, hf_model: nn.Module, config: EngineConfig) -> None:
        self.config = config
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        # chosen once: FlexAttention into the paged blocks on CUDA, the SDPA / compiled-kernel
        # path on the CPU (either may be forced, e.g. the GPU path on the CPU in tests)
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        if self.attention_backend == "flex" and self.device.type == "cuda":
            check_block_size(config.block_size)
        if self.device.type == "cpu":
            # build (first run on this machine) or load the compiled CPU kernels now, not
            # inside the first request's step
            cpu_ext.available()
        # Adapter memory: a byte budget in rank rows, filled by as many adapters as fit
        # (AdapterSlotTable keeps the resident rows within it). The pools are allocated at
        # that size now, never grown: see MultiLoRALinear for what that costs where.
        self.lora_dtype = resolve_lora_dtype(config.lora_dtype, self.dtype)
        self.adapter_budget_bytes = adapter_budget_bytes(config, self.device)
        row_bytes = adapter_row_bytes(hf_model, config.lora_dtype)
        self.adapter_budget_rows = self.adapter_budget_bytes // row_bytes
        if self.adapter_budget_rows < 1:
            raise ValueError(
                f"the adapter memory budget ({self.adapter_budget_bytes} bytes) holds no rank row of this model "
                f"({row_bytes} bytes each, {row_bytes * 16} for a rank-16 adapter); raise "
                "adapter_budget_bytes / adapter_memory_fraction"
            )
        self.num_adapter_slots = min(config.max_loras or MAX_SLOTS, self.adapter_budget_rows)
        self.model = LeanLlama(
            hf_model, num_slots=self.num_adapter_slots,
            rows=self.adapter_budget_rows, prepack=config.prepack_weights,
            lora_backend=config.lora_backend, lora_dtype=self.lora_dtype,
        )
        self.lora_backend = self.model.slots.backend
        self.flashinfer: flashinfer_paged.FlashInferAttention | None = None
        if self.attention_backend == "flashinfer":  # raises, naming the fix, where it cannot run
            self.flashinfer = flashinfer_paged.FlashInferAttention(
                flashinfer_paged.make_wrapper(self.device, self.dtype), num_heads=self.model.layers[0].num_heads,
                num_kv_heads=self.model.num_kv_heads, head_dim=self.model.head_dim, dtype=self.dtype,
                scale=self.model.layers[0].scale)
        logger.info("adapter memory budget: %.0f MiB = %d rank rows of %s (%d rank-16 adapters of all targets), "
                    "%d slots", self.adapter_budget_bytes / 2**20, self.adapter_budget_rows,
                    str(self.lora_dtype).removeprefix("torch."),
                    self.adapter_budget_rows // 16, self.num_adapter_slots)
        # decode steps on preallocated buffers (CUDA graphs on the GPU path; see decode_graphs)
        graphs = resolve_decode_graphs(config, self.device, self.attention_backend, self.lora_backend)
        # one scratch block past the budget for the buffer path's padding rows
        self.num_cache_blocks = config.num_kv_blocks + (1 if graphs != "off" else 0)
        shape = (self.num_cache_blocks * config.block_size, self.model.num_kv_heads, self.model.head_dim)
        # The KV budget is reserved once, at start: [slots, kv_heads, head_dim] per layer for K and V.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in self.model.layers
        ]
        logger.info("KV cache: %d blocks of %d tokens, %.0f MiB", config.num_kv_blocks, config.block_size, self.kv_bytes / 2**20)
        self.decode_graphs: DecodeGraphs | None = None
        if graphs != "off":
            self.decode_graphs = DecodeGraphs(
                self.model, self.kv_caches, num_blocks=self.num_cache_blocks, block_size=config.block_size,
                max_num_seqs=config.max_num_seqs, max_blocks_per_seq=-(-config.max_model_len // config.block_size),
                capture=graphs == "capture")
        if self.device.type == "cuda":
            self.warm_up()

    def warm_up(self, shrink_timer: Callable[[Callable[[], object]], float] | None = None) -> None:
        """Compile what the GPU path compiles lazily, before the first request: the Triton
        LoRA kernels for every block-size variant (on one decoder layer's own pools: all
        layers share their shapes), on a GPU after measuring the shrink's split-K and warps
        per layer width and decode segment count (which compiles every choice);
        FlexAttention for a decode step, a short prefill chunk and the longest one
        (flex_paged pads every call off the sizes torch.compile specialises, so these are all
        the variants a step can need; Inductor's FlexAttention lowering picks its decoding
        kernel below 128 queries); then the decode graphs' buckets (captured on CUDA). The
        warm-up forwards write K/V into the first cache blocks, which any sequence given them
        later overwrites before it reads them. `shrink_timer` times the shrink's launch
        choices (`triton_lora.tune_shrink`; default on CUDA: CUDA events; never measured
        elsewhere unless given, since interpreter timings mean nothing)."""
        t0 = time.perf_counter()
        launches = 0
        if self.lora_backend == "triton":
            from lorafold.kernels import triton_lora

            layer = self.model.layers[0]
            projections = (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)
            if self.device.type == "cuda" or shrink_timer is not None:
                for proj in projections:
                    triton_lora.tune_shrink(proj.a_pool, proj.ranks, shrink_timer)
                logger.info("shrink (split-K, warps) by (d_in, slices, BLOCK_R, segments): %s",
                            triton_lora.shrink_table())
            for proj in projections:
                launches += triton_lora.warm_up(proj.a_pool, proj.b_pool, proj.row_start, proj.ranks,
                                                proj.slice_offsets)
        bs = self.config.block_size
        # (q_start, q_len, ctx_len) per sequence: a decode, a 2-token chunk, the longest chunk
        # (within the cache and the model length); block tables are the first blocks (0, 1,
        # ...), so slot = position
        longest = min(self.config.max_prefill_chunk, self.config.max_model_len,
                      self.num_cache_blocks * bs - 1)
        shapes = [[(0, 1, 1)], [(0, 2, 2)]] + ([[(0, longest, longest)]] if longest > 2 else [])
        with torch.inference_mode():
            for spec in shapes:
                seqs = [(q0, q, ctx, list(range(-(-ctx // bs)))) for q0, q, ctx in spec]
                positions = [p for _, q, ctx in spec for p in range(ctx - q, ctx)]
                meta = build_attention_metadata(positions, seqs, bs, self.device, dtype=self.dtype,
                                                backend=self.attention_backend, num_blocks=self.num_cache_blocks,
                                                flashinfer=self.flashinfer)
                pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
                self.model(torch.zeros_like(pos), pos, self.kv_caches, meta)
        if self.decode_graphs is not None:  # every bucket run (and captured, on CUDA) once
            try:
                self.decode_graphs.prepare()
            except RuntimeError:  # a capture the driver or a kernel refuses: serve without graphs
                if not self.decode_graphs.capture:
                    raise
                logger.exception("CUDA graph capture failed: decode steps run eagerly (decode_graphs='off' skips it)")
                self.decode_graphs = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("warm-up: %d Triton LoRA launches and %d forwards in %.1f s", launches, len(shapes),
                    time.perf_counter() - t0)

    @property
    def kv_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)

    def base_modules(self) -> dict[str, ModuleSpec]:
        return self.model.slots.base_modules()

    def stage_adapter(self, adapter: LoRAAdapter) -> StagedAdapter:
        """The host-side copy `load_adapter` needs (thread-safe: reads only the model's shapes)."""
        return self.model.slots.stage(adapter)

    def load_adapter(self, slot: int, adapter: LoRAAdapter | StagedAdapter) -> None:
        """Copy an adapter into `slot`: one copy per pool when it is staged already."""
        self.model.slots.fill(slot, adapter)

    def free_adapter(self, slot: int) -> None:
        """Give back the rows of an adapter the slot table evicted or released."""
        self.model.slots.clear(slot)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step. Returns logits [n_sampling_chunks, vocab] in the order of the chunks
        whose `sample` flag is set."""
        bs = self.config.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        runs: list[tuple[int, int, int]] = []  # (adapter slot, first token, tokens) per chunk
        seqs: list[tuple[int, int, int, list[int]]] = []
        rows: list[int] = []
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_tokens
            seqs.append((len(ids), n, chunk.start + n, seq.block_table))
            runs.append((seq.lora_slot, len(ids), n))
            ids += chunk.token_ids
            positions += chunk.positions
            slots += slot_mapping(seq, bs, chunk.start, n)
            if chunk.sample:
                rows.append(len(ids) - 1)
        # built on the host (nothing read back from the device); moved with the step's inputs
        lora_meta = self.model.slots.host_meta(runs, len(ids)) if any(r[0] >= 0 for r in runs) else None
        if self.decode_graphs is not None and len(rows) == len(ids) == len(chunks):  # pure decode
            bucket = self.decode_graphs.bucket(len(ids), lora_meta.max_rank if lora_meta is not None else 0)
            if bucket is not None:
                return self.decode_graphs.run(ids, positions, slots, [s[3] for s in seqs], lora_meta, bucket)
        attn_meta = build_attention_metadata(slots, seqs, bs, self.device, dtype=self.dtype,
                                             backend=self.attention_backend, num_blocks=self.num_cache_blocks,
                                             flashinfer=self.flashinfer)
        n = len(ids)
        inputs = host_to_device(torch.tensor(ids + positions + rows, dtype=torch.int64), self.device)
        return self.model(
            inputs[:n],
            inputs[n : 2 * n],
            self.kv_caches,
            attn_meta,
            None if lora_meta is None else lora_meta.to(self.device),
            logits_rows=inputs[2 * n :],
        )
