"""The synchronous engine: schedule -> load adapters -> run the model -> sample -> postprocess.

Not thread-safe: `AsyncEngine` drives it from one background thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from lorafold.server.engine.adapter_cache import AdapterSlotTable
from lorafold.server.engine.adapter_prefetch import AdapterPrefetcher, prefetch_pays
from lorafold.server.engine.block_manager import BlockManager
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.model_runner import ModelRunner
from lorafold.server.engine.request_sampling import RequestSampling, build_context
from lorafold.server.engine.sampler import SamplerOutput, TokenLogprobs, sample
from lorafold.server.engine.sampling_params import SamplingParams
from lorafold.server.engine.scheduler import SampledToken, Scheduler, SchedulerOutput
from lorafold.server.engine.sequence import Sequence, SequenceStatus
from lorafold.server.engine.structured import GrammarCompiler
from lorafold.server.lora.peft_format import LoRAAdapter

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (deltas, not cumulative)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # HTTP-style class of the error: 400 the request cannot be served as asked (e.g. too long),
    # 409 its adapter could not be loaded, 422 the model produced non-finite logits for it,
    # 500 the engine failed while computing it (a bug: logged with its traceback)
    error_status: int = 400
    queue_seconds: float | None = None  # set on the request's first output: arrival -> first scheduled


@dataclass(slots=True)
class StepStats:
    """Per-step numbers for metrics."""

    num_tokens: int = 0
    num_seqs: int = 0
    num_adapters: int = 0
    num_preempted: int = 0
    adapter_loads: int = 0
    adapter_load_seconds: float = 0.0
    seconds: float = 0.0


def adapter_key(name: str, content_hash: str) -> str:
    """Identity of an adapter's weights in the engine: a re-registered name is a new key."""
    return f"{name}@{content_hash[:16]}"


def adapter_name_of(key: str) -> str:
    """The registered name inside an `adapter_key` (names never contain '@')."""
    return key.rsplit("@", 1)[0]


class LLMEngine:
    def __init__(self, hf_model: torch.nn.Module, tokenizer: object, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(hf_model, config)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        # adapters stay resident while their rows fit the memory budget (see adapter_cache)
        self.adapter_table = AdapterSlotTable(self.runner.num_adapter_slots, capacity_rows=self.runner.adapter_budget_rows)
        self.prefetcher = AdapterPrefetcher(
            self.runner.stage_adapter, max_staged=8 if prefetch_pays(config.adapter_prefetch, self.runner.device) else 0)
        eos = getattr(tokenizer, "eos_token_id", None)
        self._adapters: dict[str, LoRAAdapter] = {}  # key -> weights, while requests need them
        # The scheduler reads ranks through the dict, not through self: a closure over self
        # would make the engine a reference cycle, whose model-sized buffers only the cyclic
        # GC frees, whenever it next runs (engines built one after another then pile up).
        adapters = self._adapters
        self.scheduler = Scheduler(
            config, self.block_manager, eos_token_ids=[eos] if eos is not None else [], adapter_slots=self.adapter_table,
            adapter_rows=lambda key: adapters[key].max_rank, tokenizer=tokenizer,
        )
        self._adapter_users: dict[str, int] = {}
        self._sampling: dict[str, RequestSampling] = {}  # seeded generator, grammar position
        self._eos_ids = [eos] if eos is not None else []
        self._grammars: GrammarCompiler | None = None
        self._queue_seconds: dict[str, float] = {}  # until the first output reports it
        self.last_step = StepStats()

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: LoRAAdapter | None = None,
        adapter_name: str | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (bad request) or QueueFullError."""
        key = adapter_key(adapter_name or "adapter", adapter.content_hash) if adapter is not None else None
        vocab = self.runner.model.config.vocab_size
        if any(t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be < vocab size {vocab}")
        seq = Sequence(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params, adapter=key)
        # before the scheduler sees it: a grammar that does not compile refuses the request here
        sampling = RequestSampling.for_request(seq, self.runner.device, self.grammars if params.grammar else None)
        self.scheduler.add(seq)
        if key is not None:
            self._adapters[key] = adapter
            self._adapter_users[key] = self._adapter_users.get(key, 0) + 1
        self._sampling[request_id] = sampling

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._forget(seq)
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        outputs = [self._error_output(seq) for seq in out.finished]  # ended by the scheduler: can never fit
        for seq in out.finished:
            self._forget(seq)
        t_load = time.perf_counter()
        outputs += self._load_adapters(out)
        load_seconds = time.perf_counter() - t_load
        self._note_queue_seconds(out)
        if any(not c.seq.is_finished for c in out.chunks):
            try:
                outputs += self._run(out)
            except Exception as exc:  # noqa: BLE001 - contained: the step's requests fail, the engine lives
                logger.exception("model step failed; failing the %d requests it held", len(out.chunks))
                message = f"internal error while computing this request: {type(exc).__name__}: {exc}"
                outputs += self._fail([c.seq for c in out.chunks], message, 500)
        self.last_step = StepStats(
            num_tokens=out.num_batched_tokens, num_seqs=len(out.chunks),
            num_adapters=len({c.seq.adapter for c in out.chunks if c.seq.adapter is not None}),
            num_preempted=len(out.preempted), adapter_loads=len(out.adapter_loads),
            adapter_load_seconds=load_seconds, seconds=time.perf_counter() - t0,
        )
        return outputs

    def _note_queue_seconds(self, out: SchedulerOutput) -> None:
        """Arrival -> first scheduled, for the requests scheduled for the first time."""
        now = time.monotonic()
        for chunk in out.chunks:
            if chunk.start == 0 and chunk.seq.num_preemptions == 0:
                self._queue_seconds[chunk.seq.request_id] = now - chunk.seq.arrival_time

    def _load_adapters(self, out: SchedulerOutput) -> list[RequestOutput]:
        """Copy the step's cold adapters into their slots; a load that fails ends only the
        requests of that adapter (their chunks are then skipped by `_run`)."""
        failed: dict[str, str] = {}
        for slot in out.adapter_frees:  # evicted first: their rows make room for the loads
            self.runner.free_adapter(slot)
        loads = out.adapter_loads
        for i, load in enumerate(loads):
            # the worker stages the next loads while this thread stages / copies this one
            self.prefetcher.prefetch((later.name, self._adapters[later.name]) for later in loads[i + 1 :])
            try:
                self.runner.load_adapter(load.slot, self.prefetcher.take(load.name, self._adapters[load.name]))
            except Exception as exc:  # noqa: BLE001 - contained to this adapter's requests
                logger.exception("loading adapter %s into slot %d failed", load.name, load.slot)
                failed[load.name] = f"adapter {adapter_name_of(load.name)!r} could not be loaded: {exc}"
                self.adapter_table.invalidate(load.name)
        outputs: list[RequestOutput] = []
        for name, message in failed.items():
            outputs += self._fail([c.seq for c in out.chunks if c.seq.adapter == name], message, 409)
        self._prefetch_waiting()
        return outputs

    def _prefetch_waiting(self, scan: int = 64) -> None:
        """Stage the adapters the first `scan` waiting requests need and the device lacks, on
        the prefetcher's worker, while this step's forward runs (nothing to scan for when it
        stages nothing: the CPU default)."""
        if not self.prefetcher.enabled:
            return
        wanted: dict[str, LoRAAdapter] = {}
        for seq in itertools.islice(self.scheduler.waiting, scan):
            key = seq.adapter
            if key is not None and key not in wanted and self.adapter_table.slot_of(key) is None:
                wanted[key] = self._adapters[key]
        self.prefetcher.prefetch(wanted.items())

    def _run(self, out: SchedulerOutput) -> list[RequestOutput]:
        chunks = [c for c in out.chunks if not c.seq.is_finished]
        logits = self.runner.execute(chunks)
        sampling = [c.seq for c in chunks if c.sample]
        params = [s.sampling_params for s in sampling]
        states = [self._sampling[s.request_id] for s in sampling]
        ctx = build_context(sampling, states, self._eos_ids, logits.shape[-1])
        result: SamplerOutput = sample(logits, params, [st.generator for st in states], ctx)
        # rows that cannot go on end their own request first, so postprocess skips them
        outputs = []
        for seq, state, token, error in zip(sampling, states, result.token_ids, result.errors):
            if error is None and state.grammar is not None and not state.grammar.accept(token):
                error = f"token {token} broke the request's grammar (a bug: please report it)"
            if error is not None:
                outputs += self._fail([seq], error, 422)
        tokens = {s.request_id: t for s, t in zip(sampling, result.token_ids) if not s.is_finished}
        logprobs = dict(zip((s.request_id for s in sampling), result.logprobs))
        # a grammar that reached its end on a token other than EOS stops its request
        ended = {rid for rid in tokens if (g := self._sampling[rid].grammar) is not None and g.finished}
        done = self.scheduler.postprocess(out, tokens, ended)
        return outputs + [self._token_output(r, logprobs[r.seq.request_id]) for r in done]

    @property
    def grammars(self) -> GrammarCompiler:
        """The structured-output compiler, built on first use (it indexes the whole vocabulary)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.runner.model.config.vocab_size)
        return self._grammars

    def _fail(self, seqs: list[Sequence], message: str, status: int) -> list[RequestOutput]:
        """End these requests with an error (resources freed at once); the others go on."""
        outputs = []
        for seq in seqs:
            if seq.is_finished:
                continue
            self.scheduler.finish(seq.request_id, SequenceStatus.FINISHED_ABORTED, reason="error")
            seq.error = message
            outputs.append(self._error_output(seq, status))
            self._forget(seq)
        return outputs

    def _token_output(self, r: SampledToken, lp: TokenLogprobs | None) -> RequestOutput:
        seq = r.seq
        result = RequestOutput(
            request_id=seq.request_id, token_ids=[r.token], text=r.text, logprobs=[lp] if lp is not None else [],
            finished=seq.is_finished, finish_reason=seq.finish_reason if seq.is_finished else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            queue_seconds=self._queue_seconds.pop(seq.request_id, None),
        )
        if seq.is_finished:
            self._forget(seq)
        return result

    def _error_output(self, seq: Sequence, status: int = 400) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, finished=True, finish_reason=seq.finish_reason or "error",
            error=seq.error, error_status=status, num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
        )

    def _forget(self, seq: Sequence) -> None:
        """Drop per-request state; release the adapter weights when no request needs them."""
        self._sampling.pop(seq.request_id, None)
        self._queue_seconds.pop(seq.request_id, None)
        key = seq.adapter
        if key is not None and key in self._adapter_users:
            self._adapter_users[key] -= 1
            if self._adapter_users[key] == 0:
                del self._adapter_users[key]
                del self._adapters[key]
                self.prefetcher.discard(key)

    def snapshot(self) -> dict:
        """Counts for metrics and health; call on the engine thread."""
        info = self.scheduler.lora_requests_info()
        for label in ("running_lora_adapters", "waiting_lora_adapters"):
            names = {adapter_name_of(key) for key in info[label].split(",") if key}
            info[label] = ",".join(sorted(names))
        bm, table = self.block_manager, self.adapter_table
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "kv_used": bm.num_blocks - bm.num_free_blocks,
            "kv_total": bm.num_blocks,
            "device_resident": len(table.resident()),
            "device_resident_keys": sorted(table.resident()),
            "device_hits": table.stats.hits,
            "device_evictions": table.stats.evictions,
            "adapter_budget_bytes": self.runner.adapter_budget_bytes,
            "adapter_resident_bytes": table.used_rows * self.runner.model.slots.row_bytes,
            "lora_info": info,
        }
