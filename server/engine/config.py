"""Engine configuration: one slotted dataclass, validated on construction (torch-free).

The server's settings hold one (`ServerSettings.engine`): these are the only engine defaults
and the only place they are checked."""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flex", "flashinfer")
# "auto" + kernels.meta.BACKENDS, spelled out: this module stays torch-free (the scheduler imports it)
LORA_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "cpp")
# "auto" + server.models.loader.DTYPES, spelled out for the same reason
LORA_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `max_loras=True` is a bug, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(slots=True, kw_only=True)
class EngineConfig:
    """Sizes and limits of the serving engine.

    block_size: tokens per paged KV block.
    num_kv_blocks: KV memory budget in blocks. The server measures it from free memory at
        start (`server.engine.kv_sizing.with_measured_kv_blocks`, `gpu_memory_utilization`)
        unless `--kv-blocks` is given (`ServerSettings.measure_kv_blocks`); the default is
        only for tests and hand-built engines.
    gpu_memory_utilization: share of the GPU's whole memory this engine may hold (weights,
        adapter budget, activations and KV cache together), as vLLM's flag; in (0, 1].
    attention_backend: "sdpa" reads each context back from its blocks and runs SDPA (the
        compiled paged-decode kernel where built: float32 CPU); "flex" runs FlexAttention
        with a block mask over the paged cache (the GPU path; eager, and so testable, on the
        CPU); "flashinfer" runs FlashInfer's paged kernel (optional: CUDA, fp16/bf16, where
        flashinfer-python is installed; no decode graphs); "auto": flex on CUDA, sdpa
        elsewhere. Chosen once, at start.
    lora_backend: the multi-LoRA ops' implementation, resolved once when the model is built
        (`kernels.ops.choose_backend`): "auto" (Triton on CUDA; on the CPU the compiled kernel
        for float32, else the torch reference), "torch" (the reference), "triton" (on the CPU
        only under TRITON_INTERPRET=1: how CI runs the GPU path), "cpp".
    lora_dtype: the adapter pools' dtype, as vLLM's `--lora-dtype`: "auto" is the model's
        (exact: PEFT's numbers); "bfloat16" on a float32 CPU model halves the adapter bytes
        every step reads and the memory each adapter takes in the budget (twice the adapters
        resident), the arithmetic staying float32 (the compiled CPU kernel widens the rows as
        it reads them); the factors are rounded to bfloat16 once, when loaded. The Triton
        path (GPU) needs the model's dtype.
    decode_graphs: pure decode steps on preallocated buffers, one forward per batch-size
        bucket (`server.engine.decode_graphs`): "auto" captures them as CUDA graphs on the GPU
        path (flex + Triton on CUDA), "capture" likewise, "eager" runs the buffers without
        capture (how the CPU tests check them), "off" never.
    max_num_seqs: most sequences RUNNING at once (= most sequences in one step).
    max_num_batched_tokens: token budget of one step (decodes + prefill chunks). Must be
        >= max_num_seqs so every running decode always gets its token.
    max_prefill_chunk: a prompt is prefilled at most this many tokens per step, so one long
        prompt never starves the running decodes.
    max_model_len: context limit (prompt + generated tokens).
    adapter_budget_bytes: device memory for adapter weights (the rank-row pools of every LoRA
        layer). Adapters are resident while their rows fit; the least recently used idle one
        is evicted to make room. None: `adapter_memory_fraction` of the device's free memory
        (CUDA) or of the available RAM (CPU), measured by the model runner at start.
    adapter_memory_fraction: see adapter_budget_bytes; in (0, 1].
    max_loras: optional cap on adapters resident at once (device slots; also the most
        distinct adapters in flight and per step). None: only the memory budget limits them.
    max_queue: most requests WAITING; `Scheduler.add` raises QueueFullError beyond it.
    max_overtakes: a waiting request held back by the adapter cap may be overtaken by
        requests behind it at most this many times; then it becomes a barrier (nothing
        behind it is admitted until it is), which bounds its wait.
    adapter_prefetch: stage the adapters waiting requests need (laid out as the pools hold
        them) on a worker thread ahead of their loads, so a load is one copy per pool
        (`adapter_prefetch`): "on", "off" (a load lays the adapter out straight into its
        slot on the engine thread), or "auto": on where the worker has a core of its own (a
        GPU server; a CPU with more cores than torch's threads), off where every core runs
        the forward: there the worker's staging takes its cycles from the forward and the
        load then copies the staged block again, two passes where inline is one (the
        cold-start many-adapter benchmark measured the two the same on this 2-core VM;
        docs/benchmarks.md).
    prepack_weights: on CPU (fp32), keep oneDNN-packed copies of the base weights for the
        decode-sized matmuls (faster decode steps for one more copy of the weights in memory;
        `server.models.packed_linear`). Ignored where packing is unavailable.
    """

    block_size: int = 16
    num_kv_blocks: int = 1024
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 256
    max_model_len: int = 2048
    adapter_budget_bytes: int | None = None
    adapter_memory_fraction: float = 0.1
    max_loras: int | None = None
    max_queue: int = 256
    max_overtakes: int = 16
    adapter_prefetch: str = "auto"
    prepack_weights: bool = True
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"
    lora_backend: str = "auto"
    lora_dtype: str = "auto"
    decode_graphs: str = "auto"

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, 1)
        _check_int("num_kv_blocks", self.num_kv_blocks, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_prefill_chunk", self.max_prefill_chunk, 1)
        _check_int("max_model_len", self.max_model_len, 2)
        if self.max_loras is not None:
            _check_int("max_loras", self.max_loras, 1)
        if self.adapter_budget_bytes is not None:
            _check_int("adapter_budget_bytes", self.adapter_budget_bytes, 1)
        fraction = self.adapter_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"adapter_memory_fraction must be a number in (0, 1], got {fraction!r}")
        _check_int("max_queue", self.max_queue, 1)
        _check_int("max_overtakes", self.max_overtakes, 0)
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {util!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.decode_graphs not in ("auto", "capture", "eager", "off"):
            raise ValueError(f"decode_graphs must be auto, capture, eager or off, got {self.decode_graphs!r}")
        if self.lora_backend not in LORA_BACKENDS:
            raise ValueError(f"lora_backend must be one of {', '.join(LORA_BACKENDS)}, got {self.lora_backend!r}")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {', '.join(LORA_DTYPES)}, got {self.lora_dtype!r}")
        if self.adapter_prefetch not in ("auto", "on", "off"):
            raise ValueError(f"adapter_prefetch must be auto, on or off, got {self.adapter_prefetch!r}")
        if not isinstance(self.prepack_weights, bool):
            raise ValueError(f"prepack_weights must be true or false, got {self.prepack_weights!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running decode gets its token each step; "
                "raise max_num_batched_tokens or lower max_num_seqs"
            )
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ValueError(
                f"max_prefill_chunk ({self.max_prefill_chunk}) must be <= max_num_batched_tokens "
                f"({self.max_num_batched_tokens}); lower max_prefill_chunk"
            )

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.num_kv_blocks * self.block_size
