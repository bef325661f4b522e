"""`AsyncEngine`: the engine loop in its own thread, and an asyncio iterator of output deltas per
request for the server. A consumer that stops iterating (client disconnect) aborts its request."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerStats

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests in flight cannot finish."""


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, *, engine: LLMEngine | None = None):
        self.engine = engine if engine is not None else LLMEngine(config)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self._lock = threading.Lock()  # the scheduler is not thread-safe: one user at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pagejax-engine", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str | None = None,
        *,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield `RequestOutput` deltas until the request finishes.

        Raises ValueError (bad input) or QueueFullError before the first output.
        """
        if self._error is not None:
            raise EngineDeadError(str(self._error))
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._queues[request_id] = (loop, queue)
        add = loop.run_in_executor(None, self._add, request_id, prompt, sampling_params, priority)
        try:
            await asyncio.shield(add)
        except BaseException as e:
            self._queues.pop(request_id, None)
            if not isinstance(e, Exception):  # cancelled: the add may still land, so abort
                # once it has, in a worker thread (nothing can be awaited in a cancelled task)
                add.add_done_callback(lambda _: loop.run_in_executor(None, self.abort, request_id))
            raise
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise EngineDeadError(str(out)) from out
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away: free its pages now, without awaiting,
                # since a cancelled task (client disconnect) may not await anything
                loop.run_in_executor(None, self.abort, request_id)

    @property
    def is_alive(self) -> bool:
        """False once the engine loop died (for /health)."""
        return self._error is None and self._thread.is_alive()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort_request(request_id)

    def stats(self) -> SchedulerStats:
        with self._lock:
            return self.engine.scheduler.stats()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- engine thread ----------------------------------------------------------------------
    def _add(
        self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int
    ) -> None:
        with self._lock:
            self.engine.add_request(request_id, prompt, params, priority=priority)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                try:
                    outputs = self.engine.step(delta=True) if busy else []
                except Exception as e:  # a bug: fail every request in flight, loudly
                    logger.exception("engine step failed")
                    self._error = e
                    for loop, queue in list(self._queues.values()):
                        loop.call_soon_threadsafe(queue.put_nowait, e)
                    return
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for out in outputs:
                entry = self._queues.get(out.request_id)
                if entry is not None:
                    loop, queue = entry
                    loop.call_soon_threadsafe(queue.put_nowait, out)
