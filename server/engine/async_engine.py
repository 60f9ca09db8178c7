"""Async front of the engine: submit -> async stream of outputs; abort frees everything at once.

The engine loop runs on one background thread (model steps are blocking torch calls; they
must never run on the event loop). All engine state is touched only by that thread: the
event loop hands it commands through a queue, and it hands outputs back with
`call_soon_threadsafe` into one asyncio.Queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lorafold.server.engine.engine import LLMEngine, RequestOutput, StepStats
from lorafold.server.engine.sampling_params import SamplingParams
from lorafold.server.lora.peft_format import LoRAAdapter

logger = logging.getLogger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine cannot answer now (HTTP 503)."""


class EngineDeadError(EngineUnavailableError):
    """The engine loop stopped on an unexpected error; the server must be restarted."""


class EngineStepError(RuntimeError):
    """A step failed outside any one request; the requests it held were aborted (HTTP 500)."""


class EngineTimeoutError(EngineUnavailableError):
    """The engine thread did not answer a call in time (a long step, or a stuck engine)."""


# A call into the engine thread waits at most this long: probes and admin routes answer
# instead of hanging on an engine that is stuck or gone.
CALL_TIMEOUT_S = 5.0


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, on_step: Callable[[StepStats], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorafold-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ---- requests ------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: LoRAAdapter | None = None,
        adapter_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Cancelling the iteration aborts the request."""
        if not self.running:
            raise EngineDeadError(f"the engine is not running ({self.error!r}); restart the server")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop=loop, queue=asyncio.Queue())
        accepted: asyncio.Future = loop.create_future()

        def submit() -> None:
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, adapter, adapter_name)
            except Exception as exc:  # noqa: BLE001 - any refusal goes back to the caller as-is
                loop.call_soon_threadsafe(_set_exception, accepted, exc)
                return
            self._streams[request_id] = stream
            loop.call_soon_threadsafe(_set_result, accepted, None)

        self._submit(submit)
        await accepted  # raises the engine's ValueError / QueueFullError
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client disconnect, cancel): free everything now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        def run() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

        self._submit(run)

    async def call(self, fn: Callable[[LLMEngine], object], timeout: float = CALL_TIMEOUT_S) -> object:
        """Run `fn(engine)` on the engine thread (e.g. a consistent snapshot for metrics).

        Raises EngineDeadError when the engine has stopped, EngineTimeoutError after `timeout`.
        """
        if not self.running:
            raise EngineDeadError(f"the engine is not running ({self.error!r}); restart the server")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._submit(run)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError as exc:
            raise EngineTimeoutError(f"the engine did not answer within {timeout:g} s; try again") from exc

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- the loop (engine thread) --------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._iterate()
                except Exception:  # noqa: BLE001 - a failed step ends its requests, not the engine
                    logger.exception("engine step failed; failing every request in flight")
                    self._fail_in_flight()
        except Exception as exc:  # noqa: BLE001 - the loop must report, not vanish
            logger.exception("engine loop failed")
            self.error = exc
            for rid in list(self._streams):
                self._deliver_error(rid, EngineDeadError(f"engine failed: {exc}"))

    def _iterate(self) -> None:
        self._drain_commands()
        if not self.engine.has_unfinished():
            self._wake.wait(0.05)
            self._wake.clear()
            return
        outputs = self.engine.step()
        if self.on_step is not None:
            self.on_step(self.engine.last_step)
        for out in outputs:
            self._deliver(out)

    def _fail_in_flight(self) -> None:
        """After a step failed outside any one request: abort every request (freeing its
        blocks and adapter pins) and tell its client. If even that fails, the loop ends."""
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._deliver_error(rid, EngineStepError("the engine failed while computing this request; "
                                                     "it was aborted and the server goes on"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception:  # noqa: BLE001 - one bad command must not stop the loop
                logger.exception("engine command failed")

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)


def _set_result(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
