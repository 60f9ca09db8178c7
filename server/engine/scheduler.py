"""Iteration-level scheduler with chunked prefill, recompute preemption and adapter-aware admission.

Torch-free. The engine loop is: `out = schedule()` -> load `out.adapter_loads` -> run the
model on `out.chunks` -> `postprocess(out, sampled)`, which appends each sampled token,
detokenizes it and finishes the sequences that reached EOS, a stop token, a stop string or
a length limit; the engine emits the returned text and finishes.

Rules of `schedule()` (one step):

1. RUNNING sequences first, oldest arrival first. A decode (one uncomputed token) always
   gets its token: the budget for prefill chunks of running sequences is what is left after
   reserving one token for every running decode (max_num_batched_tokens >= max_num_seqs is
   enforced by EngineConfig). A partially prefilled sequence gets its next chunk of at most
   max_prefill_chunk tokens.
2. KV pressure: when a running sequence cannot get even one block, the most recently
   arrived running sequence not yet scheduled this step is preempted (recompute: blocks
   freed, num_computed_tokens = 0, outputs kept, put at the FRONT of the waiting queue,
   adapter slot unpinned) until it fits; if it is itself the newest, it is preempted. A
   prefill chunk is shortened to the space there is before anything is preempted for it.
3. WAITING sequences are admitted FCFS, only in steps with no preemption (else the victim
   would be readmitted at once and thrash). Admission needs a free seat (max_num_seqs),
   budget left, and KV blocks for ALL its known tokens (allocated at once, so a chunked
   prefill never stalls half-way for lack of blocks). If the head lacks seats, budget or
   blocks, admission stops: no overtaking for capacity.
4. Adapters (see `adapter_cache`): a running sequence pins its adapter, and the adapters
   resident at once are bounded by the adapter memory budget (rows) and the slot count
   (max_loras). Admission goes in two passes over the queue, in FCFS order:
   a. requests on the base model or on a resident adapter (no load), and aged requests;
   b. then the requests that need a load, each only if its adapter fits in free room or by
      evicting idle adapters that no waiting request needs (least recently used first):
      an adapter the waiting queue still uses is never evicted to make room for another.
   A request skipped for its adapter is overtaken by every request behind it that is
   admitted first; its `num_overtaken` counts them. Once it reaches config.max_overtakes it
   is aged: it goes in pass (a), it may evict any idle adapter, and it is a barrier (nothing
   behind it is admitted until it is). Bound: a request is overtaken at most max_overtakes
   times, then waits only for sequences already running to free seats, KV blocks or adapter
   pins, and each of them finishes within max_model_len tokens: no starvation.
   A request whose adapter alone exceeds the whole budget is finished with an error.
5. A sequence whose known tokens need more blocks than the whole cache is finished with
   finish_reason "error" (listed in `SchedulerOutput.finished`) instead of looping.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable

from lorafold.server.engine.adapter_cache import AdapterSlotTable
from lorafold.server.engine.block_manager import BlockManager
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.detokenizer import IncrementalDetokenizer, Tokenizer
from lorafold.server.engine.schedule_output import AdapterLoad, SampledToken, ScheduledChunk, SchedulerOutput
from lorafold.server.engine.sequence import Sequence, SequenceStatus

__all__ = ["AdapterLoad", "QueueFullError", "SampledToken", "ScheduledChunk", "Scheduler", "SchedulerOutput"]

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at max_queue; the caller should answer 429 / retry later."""


class _Skipped:
    """Requests one admission pass skipped, and how often later ones overtook them: each
    admission after a skip overtakes it. `at_limit`: one more would overtake one of them past
    max_overtakes (it is aged and must go first)."""

    def __init__(self, max_overtakes: int) -> None:
        self.max_overtakes = max_overtakes
        self.admitted = 0
        self.seqs: list[Sequence] = []
        self._marks: list[int] = []
        self._worst = -1  # max over skips of num_overtaken - admitted at the skip

    def skip(self, seq: Sequence) -> None:
        self.seqs.append(seq)
        self._marks.append(self.admitted)
        self._worst = max(self._worst, seq.num_overtaken - self.admitted)

    @property
    def at_limit(self) -> bool:
        return bool(self.seqs) and self._worst + self.admitted >= self.max_overtakes

    def settle(self) -> None:
        for seq, mark in zip(self.seqs, self._marks):
            seq.num_overtaken += self.admitted - mark


class _NeededByOthers:
    """The adapters waiting requests still need, but `own`: the names a load for `own` must
    not evict. A view of the step's counts (no set built per candidate)."""

    def __init__(self, needed: Counter, own: str) -> None:
        self.needed, self.own = needed, own

    def __contains__(self, name: object) -> bool:
        return name != self.own and self.needed.get(name, 0) > 0


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        *,
        eos_token_ids: Iterable[int] = (),
        adapter_slots: AdapterSlotTable | None = None,
        adapter_rows: Callable[[str], int] | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """adapter_slots: the device slot table (default: max_loras slots, 8 when unset, no row
        budget). adapter_rows: rank rows an adapter holds on the device (its largest rank);
        default 1 each, which makes the table's row budget a count of adapters. tokenizer:
        decodes the output text and so finds stop strings (None: no text, no stop strings)."""
        if block_manager.block_size != config.block_size:
            raise ValueError(f"block manager block_size {block_manager.block_size} != config {config.block_size}")
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        if adapter_slots is None:
            adapter_slots = AdapterSlotTable(config.max_loras or 8)
        self.adapter_slots = adapter_slots
        self.adapter_rows = adapter_rows or (lambda name: 1)
        if config.max_loras is not None and self.adapter_slots.num_slots > config.max_loras:
            raise ValueError(f"adapter table has {self.adapter_slots.num_slots} slots > max_loras {config.max_loras}")
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by (arrival_time, submission order)
        self._requests: dict[str, Sequence] = {}  # every unfinished sequence
        self._order: dict[str, int] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}  # output text and stop strings, per request
        self._counter = itertools.count()

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    def running_adapters(self) -> set[str]:
        return {s.adapter for s in self.running if s.adapter is not None}

    def waiting_adapters(self) -> set[str]:
        """Adapters the waiting queue will need (also what to prefetch to host memory)."""
        return {s.adapter for s in self.waiting if s.adapter is not None}

    def lora_requests_info(self) -> dict[str, str]:
        """Labels of vLLM's `vllm:lora_requests_info` gauge (comma-joined, as gateways expect)."""
        return {
            "max_lora": str(self.adapter_slots.num_slots),
            "running_lora_adapters": ",".join(sorted(self.running_adapters())),
            "waiting_lora_adapters": ",".join(sorted(self.waiting_adapters())),
        }

    # ---- requests in and out -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new request. Raises QueueFullError, or ValueError for a bad request."""
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"{seq!r} is not a fresh WAITING sequence")
        if seq.request_id in self._requests:
            raise ValueError(f"request id {seq.request_id!r} is already in flight; use a unique id")
        if seq.num_prompt_tokens >= self.config.max_model_len:
            raise ValueError(
                f"request {seq.request_id}: the prompt has {seq.num_prompt_tokens} tokens but the context limit "
                f"(max_model_len) is {self.config.max_model_len}, leaving no room to generate; shorten the prompt"
            )
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_queue} requests); retry later")
        stop = seq.sampling_params.stop
        if self.tokenizer is not None:
            self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, stop=stop)
        elif stop:
            raise ValueError(f"request {seq.request_id}: stop strings need a scheduler with a tokenizer")
        self._requests[seq.request_id] = seq
        self._order[seq.request_id] = next(self._counter)
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """End a request wherever it is, freeing its blocks and adapter pin at once."""
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, SequenceStatus.FINISHED_ABORTED)
        return seq

    def finish(self, request_id: str, status: SequenceStatus, reason: str | None = None) -> Sequence | None:
        """End a request for a reason found outside the scheduler (e.g. the model failed on
        it); `reason` overrides the status's finish_reason (e.g. "error")."""
        if not status.is_finished:
            raise ValueError(f"finish needs a FINISHED_* status, got {status}")
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, status, reason)
        return seq

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out)
        # As in vLLM: no admission in a step that preempted. With whole-footprint admission
        # and the victim at the head of the queue this cannot change the outcome today; it
        # keeps a victim from being readmitted at once if those rules ever change.
        if not out.preempted:
            self._admit_waiting(out, budget)
        out.adapter_frees = self.adapter_slots.take_released()
        return out

    def _schedule_running(self, out: SchedulerOutput) -> int:
        cfg, bm = self.config, self.block_manager
        budget = cfg.max_num_batched_tokens
        queue = deque(self.running)
        pending_decodes = sum(1 for s in queue if s.num_uncomputed == 1)
        while queue:
            seq = queue.popleft()
            decode = seq.num_uncomputed == 1
            if decode:
                pending_decodes -= 1
            if self._never_fits(seq, out):
                continue
            want = 1 if decode else min(seq.num_uncomputed, cfg.max_prefill_chunk, budget - pending_decodes)
            if want < 1:
                continue  # no budget left for this prefill chunk this step; it stays RUNNING
            while bm.max_new_tokens(seq) < 1:
                victim = queue.pop() if queue else seq
                if victim is not seq and victim.num_uncomputed == 1:
                    pending_decodes -= 1  # its reserved decode token is no longer needed
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                num = min(want, bm.max_new_tokens(seq))
                bm.allocate(seq, num)
                out.chunks.append(ScheduledChunk.next_of(seq, num))
                budget -= num
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Rule 4's two passes. Stops at the first request that lacks a seat, token budget or
        KV blocks (strict FCFS for capacity) and at an aged request that cannot be placed;
        where an admission would overtake a skipped request past max_overtakes, pass (a)
        ends and pass (b) admits the skipped ones with the room left."""
        queue = list(self.waiting)
        needed = Counter(s.adapter for s in queue if s.adapter is not None)  # adapters the queue uses
        deferred = _Skipped(self.config.max_overtakes)  # skipped in pass (a) for their adapter
        stopped = False
        for seq in queue:  # pass (a)
            if seq.adapter is not None and self.adapter_slots.slot_of(seq.adapter) is None:
                if seq.num_overtaken < self.config.max_overtakes:
                    deferred.skip(seq)
                    continue
            if deferred.at_limit:
                # one more would overtake a skipped request past max_overtakes: the skipped
                # ones (all ahead of `seq`) go first, in pass (b), with the step's room left
                break
            num = self._try_admit(seq, out, budget, needed, aged=True)
            if num is None:  # no seat, budget or KV blocks: strict FCFS stops the step's admissions
                stopped = True
                break
            deferred.admitted += num > 0
            budget -= num
        deferred.settle()
        held = _Skipped(self.config.max_overtakes)  # skipped in pass (b)
        for seq in deferred.seqs if not stopped else ():  # pass (b)
            num = None if held.at_limit else self._try_admit(seq, out, budget, needed, aged=False)
            if num is None:
                break
            if num == 0 and not seq.is_finished:
                held.skip(seq)
            held.admitted += num > 0
            budget -= num
        held.settle()
        self.waiting = deque(s for s in queue if s.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED))

    def _try_admit(self, seq: Sequence, out: SchedulerOutput, budget: int, needed: Counter, *, aged: bool) -> int | None:
        """Admit `seq` if it can start now. Returns the tokens scheduled (> 0), 0 when it was
        skipped (or finished with an error) and the pass goes on, None when the pass stops."""
        cfg, bm, slots = self.config, self.block_manager, self.adapter_slots
        if len(self.running) >= cfg.max_num_seqs or budget < 1:
            return None
        if self._never_fits(seq, out) or self._adapter_never_fits(seq, out):
            return 0  # _finish removed it from the queue
        if seq.adapter is not None:
            rows = self.adapter_rows(seq.adapter)
            # aged: may evict any idle adapter; else none that another waiting request needs.
            # Pass (a) already admitted (pinned) the waiters of resident adapters or stopped the
            # step, so this guard rarely binds; it states the rule where the eviction happens.
            protected = () if aged else _NeededByOthers(needed, seq.adapter)
            if not slots.can_acquire(seq.adapter, rows, protected):
                return None if aged else 0  # aged: a barrier; else overtaken
        if bm.num_new_blocks(seq, seq.num_uncomputed) > bm.num_free_blocks:
            return None  # strict FCFS for KV space
        self._start(seq, out, protected if seq.adapter is not None else ())
        if seq.adapter is not None:
            needed[seq.adapter] -= 1
        num = min(seq.num_uncomputed, cfg.max_prefill_chunk, budget)
        out.chunks.append(ScheduledChunk.next_of(seq, num))
        return num

    def _adapter_never_fits(self, seq: Sequence, out: SchedulerOutput) -> bool:
        if seq.adapter is None or self.adapter_slots.fits(rows := self.adapter_rows(seq.adapter)):
            return False
        seq.error = (
            f"request {seq.request_id}: its adapter needs {rows} rank rows of adapter memory but the whole budget "
            f"holds {self.adapter_slots.capacity_rows}; raise --adapter-memory-fraction / --adapter-budget-mb"
        )
        logger.warning(seq.error)
        self._finish(seq, SequenceStatus.FINISHED_ABORTED, reason="error")
        out.finished.append(seq)
        return True

    def _start(self, seq: Sequence, out: SchedulerOutput, protected: Collection[str] = ()) -> None:
        self.block_manager.allocate(seq, seq.num_uncomputed)
        if seq.adapter is not None:
            slot, needs_load = self.adapter_slots.acquire(seq.adapter, self.adapter_rows(seq.adapter), protected)
            seq.lora_slot = slot
            if needs_load:
                out.adapter_loads.append(AdapterLoad(seq.adapter, slot))
        seq.status = SequenceStatus.RUNNING
        self._insert_running(seq)

    def _insert_running(self, seq: Sequence) -> None:
        key = self._key(seq)
        i = len(self.running)
        while i > 0 and self._key(self.running[i - 1]) > key:
            i -= 1
        self.running.insert(i, seq)

    def _key(self, seq: Sequence) -> tuple[float, int]:
        return seq.arrival_time, self._order[seq.request_id]

    def _never_fits(self, seq: Sequence, out: SchedulerOutput) -> bool:
        need = self.block_manager.blocks_needed(seq.num_tokens)
        if need <= self.block_manager.num_blocks:
            return False
        seq.error = (
            f"request {seq.request_id} needs {need} KV blocks for {seq.num_tokens} tokens but the cache has only "
            f"{self.block_manager.num_blocks}; raise num_kv_blocks or lower max_tokens / max_model_len"
        )
        logger.warning(seq.error)
        self._finish(seq, SequenceStatus.FINISHED_ABORTED, reason="error")
        out.finished.append(seq)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed_tokens = 0  # recompute prompt + outputs when readmitted
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        logger.debug("preempted %s (KV blocks exhausted)", seq.request_id)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.lora_slot >= 0:
            self.adapter_slots.unpin(seq.lora_slot)
            seq.lora_slot = -1

    def _finish(self, seq: Sequence, status: SequenceStatus, reason: str | None = None) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = status
        seq.finish_reason = reason or status.finish_reason
        del self._requests[seq.request_id]
        del self._order[seq.request_id]
        self._detok.pop(seq.request_id, None)

    # ---- after the model ran -------------------------------------------------------------

    def postprocess(
        self, output: SchedulerOutput, sampled: dict[str, int], ended: Collection[str] = ()
    ) -> list[SampledToken]:
        """Advance progress by the chunks that ran, append the sampled tokens, and finish the
        sequences they end. Returns each appended token with the text it adds to the stream.

        sampled: request id -> token, for every chunk with sample=True (but sequences that
        finished while the step ran, which are skipped). ended: requests whose structured-output
        grammar reached its end with this token; they stop as on a stop token.
        Finish order: EOS / stop token / length, then the grammar's end, then a stop string
        (its stop_reason); the first that applies gives the finish_reason.
        """
        results: list[SampledToken] = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.is_finished or seq.status is not SequenceStatus.RUNNING:
                continue  # aborted / finished while the step ran
            if seq.num_computed_tokens != chunk.start:
                raise RuntimeError(f"{seq!r} moved since it was scheduled at {chunk.start}; postprocess once per step")
            seq.num_computed_tokens += chunk.num_tokens
            if not chunk.sample:
                continue
            if seq.request_id not in sampled:
                raise KeyError(f"no sampled token for {seq.request_id}, whose chunk had sample=True")
            token = sampled[seq.request_id]
            seq.output_token_ids.append(token)
            status = self._stop_status(seq, token)
            if status is None and seq.request_id in ended:
                seq.stop_reason, status = None, SequenceStatus.FINISHED_STOPPED
            text = ""
            detok = self._detok.get(seq.request_id)
            if detok is not None:
                text = detok.add(token)
                if status is None and detok.finished:  # a stop string matched: the text is cut before it
                    seq.stop_reason, status = detok.stop_string, SequenceStatus.FINISHED_STOPPED
                elif status is not None and not detok.finished:
                    text += detok.flush()  # the end of the stream: nothing more to wait for
            if status is not None:
                self._finish(seq, status)
            results.append(SampledToken(seq, token, text))
        return results

    def _stop_status(self, seq: Sequence, token: int) -> SequenceStatus | None:
        params = seq.sampling_params
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.stop_reason = None  # as in OpenAI / vLLM: EOS is the natural end, no stop_reason
            return SequenceStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            seq.stop_reason = token
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None
