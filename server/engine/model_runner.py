"""The model runner: owns every tensor of the engine (weights, adapter pools, KV cache).

It turns one scheduler step (prefill chunks and decode tokens of many sequences, each with
its own adapter slot) into a single flat forward over the paged KV cache and returns the
logits of the rows that sample. The scheduler and its bookkeeping never see a tensor.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from lorafold.kernels import cpu_ext
from lorafold.kernels.ops import force_backend
from lorafold.server.engine.attention import build_attention_metadata
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.decode_graphs import DecodeGraphs
from lorafold.server.engine.flex_paged import check_block_size
from lorafold.server.engine.host_memory import keep_freed_memory
from lorafold.server.engine.llama import LeanLlama
from lorafold.server.engine.scheduler import ScheduledChunk
from lorafold.server.lora.context import lora_batch
from lorafold.server.lora.peft_format import LoRAAdapter, ModuleSpec
from lorafold.server.lora.slots import StagedAdapter
from lorafold.server.models.loader import LLAMA_TARGETS

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


def adapter_row_bytes(hf_model: nn.Module) -> int:
    """Bytes of one rank row in every LoRA pool: sum of (in + out) over the target linears."""
    linears = [m for name, m in hf_model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    itemsize = next(hf_model.parameters()).element_size()
    return sum(m.in_features + m.out_features for m in linears) * itemsize


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


def resolve_decode_graphs(config: EngineConfig, device: torch.device, attention_backend: str) -> str:
    """"capture" (CUDA graphs), "eager" (the same buffers, no capture: CPU tests) or "off".
    The buffer path needs FlexAttention and the Triton LoRA kernels (no per-step CPU plan)."""
    gpu_path = attention_backend == "flex" and (
        config.lora_backend == "triton" or (config.lora_backend == "auto" and device.type == "cuda"))
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


def check_lora_backend(name: str, device: torch.device) -> None:
    """Refuse at start a LoRA backend that cannot run on `device`, rather than on a request."""
    if name == "triton" and device.type != "cuda":
        from lorafold.kernels.triton_lora import INTERPRET

        if not INTERPRET:
            raise ValueError("lora_backend='triton' on the CPU runs only under Triton's interpreter: set "
                             "TRITON_INTERPRET=1 before lorafold is imported (tests), or use 'auto'")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"lora_backend='cpp' is the compiled CPU kernel; the model is on {device}: use 'auto'")


class ModelRunner:
    def __init__(self, hf_model: nn.Module, config: EngineConfig, *, lora_rows_per_slot: int = 16) -> None:
        self.config = config
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        # chosen once: FlexAttention into the paged blocks on CUDA, the SDPA / compiled-kernel
        # path on the CPU (either may be forced, e.g. the GPU path on the CPU in tests)
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        if self.attention_backend == "flex" and self.device.type == "cuda":
            check_block_size(config.block_size)
        check_lora_backend(config.lora_backend, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on every step's temporaries (see host_memory)
            # build (first run on this machine, ~15 s) or load the compiled CPU kernels now,
            # not inside the first request's step
            cpu_ext.available()
        # Adapter memory: a byte budget in rank rows, filled by as many adapters as fit
        # (AdapterSlotTable keeps the resident rows within it, the pools never grow past it).
        self.adapter_budget_bytes = adapter_budget_bytes(config, self.device)
        row_bytes = adapter_row_bytes(hf_model)
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
            rows=min(self.adapter_budget_rows, (config.max_loras or 8) * lora_rows_per_slot), prepack=config.prepack_weights,
        )
        self.model.slots.limit_rows(self.adapter_budget_rows)
        if self.model.slots.row_bytes != row_bytes:
            raise RuntimeError(f"LoRA pools hold {self.model.slots.row_bytes} bytes per row, expected {row_bytes}")
        logger.info("adapter memory budget: %.0f MiB = %d rank rows (%d rank-16 adapters of all targets), %d slots",
                    self.adapter_budget_bytes / 2**20, self.adapter_budget_rows, self.adapter_budget_rows // 16,
                    self.num_adapter_slots)
        # decode steps on preallocated buffers (CUDA graphs on the GPU path; see decode_graphs)
        graphs = resolve_decode_graphs(config, self.device, self.attention_backend)
        # one scratch block past the budget for the buffer path's padding rows
        self.num_cache_blocks = config.num_kv_blocks + (1 if graphs != "off" else 0)
        shape = (self.num_cache_blocks * config.block_size, self.model.num_kv_heads, self.model.head_dim)
        # The KV budget is reserved once, at start: [slots, kv_heads, head_dim] per layer for K and V.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in self.model.layers
        ]
        logger.info("KV cache: %d blocks of %d tokens, %.0f MiB", config.num_kv_blocks, config.block_size, self.kv_bytes / 2**20)
        if self.device.type == "cuda":
            self.warm_up()
        self.decode_graphs: DecodeGraphs | None = None
        if graphs != "off":
            try:
                self.decode_graphs = DecodeGraphs(
                    self.model, self.kv_caches, num_blocks=self.num_cache_blocks, block_size=config.block_size,
                    max_num_seqs=config.max_num_seqs, max_blocks_per_seq=-(-config.max_model_len // config.block_size),
                    lora_backend=config.lora_backend, capture=graphs == "capture",
                )
            except RuntimeError:  # a capture the driver or a kernel refuses: serve without graphs
                if graphs != "capture":
                    raise
                logger.exception("CUDA graph capture failed: decode steps run eagerly (decode_graphs='off' skips it)")

    def warm_up(self) -> None:
        """Compile what the GPU path compiles lazily, before the first request: the Triton
        LoRA kernels for every block-size variant (on one decoder layer's own pools: all
        layers share their shapes) and FlexAttention for decode and prefill batches of one
        and of two sequences (torch.compile specialises sizes 0/1; dynamic shapes cover
        the rest). The warm-up forwards write K/V into the first cache blocks, which any sequence
        given them later overwrites before it reads them."""
        t0 = time.perf_counter()
        launches = 0
        if self.config.lora_backend in ("auto", "triton"):
            from lorafold.kernels import triton_lora

            layer = self.model.layers[0]
            for proj in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj):
                launches += triton_lora.warm_up(proj.a_pool, proj.b_pool, proj.row_start, proj.ranks,
                                                proj.slice_offsets)
        bs = self.config.block_size
        # (q_start, q_len, ctx_len): decodes of 1 and 2 sequences, prefill chunks of 1 and 2;
        # block tables are the first blocks (0, 1, ...), so slot = position
        shapes = ([(0, 1, 1)], [(0, 1, 1), (1, 1, 2)], [(0, 2, 2)], [(0, 2, 2), (2, 2, 3)])
        with torch.inference_mode():
            for spec in shapes:
                seqs = [(q0, q, ctx, list(range(-(-ctx // bs)))) for q0, q, ctx in spec]
                positions = [p for _, q, ctx in spec for p in range(ctx - q, ctx)]
                meta = build_attention_metadata(positions, seqs, bs, self.device, dtype=self.dtype,
                                                backend=self.attention_backend, num_blocks=self.num_cache_blocks)
                pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
                with lora_batch(None), force_backend(self.config.lora_backend):
                    self.model(torch.zeros_like(pos), pos, self.kv_caches, meta)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("warm-up: %d Triton LoRA launches and %d forwards in %.1f s", launches, len(shapes),
                    time.perf_counter() - t0)

    @property
    def kv_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)

    def base_modules(self) -> dict[str, ModuleSpec]:
        return self.model.slots.base_modules()

    @property
    def adapter_pool_bytes(self) -> int:
        """Bytes the adapter pools take now (grown on demand up to the budget)."""
        return self.model.slots.pool_bytes

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
        slot_mapping: list[int] = []
        token_slots: list[int] = []
        seqs: list[tuple[int, int, int, list[int]]] = []
        rows: list[int] = []
        # Run sequences grouped by adapter, their adapters packed together in the pools where
        # the torch CPU path reads them (it then reads views instead of gathering; the GPU
        # kernels and the compiled CPU kernel read any layout); logits are put back in the
        # callers' chunk order below.
        if self.model.slots.needs_cpu_plan:
            self.model.slots.pack_active({c.seq.lora_slot for c in chunks if c.seq.lora_slot >= 0})
        order = self.model.slots.batch_order([c.seq.lora_slot for c in chunks], [c.num_tokens for c in chunks])
        sampled_in_order: list[int] = []
        for idx in order:
            chunk = chunks[idx]
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            q_start = len(ids)
            ids.extend(seq.token_ids(start, start + n))
            positions.extend(range(start, start + n))
            table = seq.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            token_slots.extend([seq.lora_slot] * n)
            seqs.append((q_start, n, start + n, table))
            if chunk.sample:
                rows.append(len(ids) - 1)
                sampled_in_order.append(idx)
        with force_backend(self.config.lora_backend):
            lora_meta = self.model.slots.meta(token_slots) if any(s >= 0 for s in token_slots) else None
        bucket = None
        if self.decode_graphs is not None and len(rows) == len(ids) == len(chunks):  # pure decode
            bucket = self.decode_graphs.bucket(len(ids), lora_meta.max_rank if lora_meta is not None else 0)
        if bucket is not None:
            logits = self.decode_graphs.run(ids, positions, slot_mapping, [s[3] for s in seqs], lora_meta, bucket)
            back = sorted(range(len(sampled_in_order)), key=sampled_in_order.__getitem__)
            return logits if back == list(range(len(back))) else logits[torch.tensor(back, device=logits.device)]
        attn_meta = build_attention_metadata(slot_mapping, seqs, bs, self.device, dtype=self.dtype,
                                             backend=self.attention_backend, num_blocks=self.num_cache_blocks)
        with lora_batch(lora_meta), force_backend(self.config.lora_backend):
            logits = self.model(
                torch.tensor(ids, device=self.device),
                torch.tensor(positions, device=self.device),
                self.kv_caches,
                attn_meta,
                torch.tensor(rows, dtype=torch.int64, device=self.device),
            )
        # row k of `logits` belongs to chunk sampled_in_order[k]; callers expect chunk order
        back = sorted(range(len(sampled_in_order)), key=sampled_in_order.__getitem__)
        if back == list(range(len(back))):
            return logits
        return logits[torch.tensor(back, device=logits.device)]
