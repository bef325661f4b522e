"""`AsyncEngine`: the engine loop in its own thread, and an asyncio iterator of output deltas per
request for the server. A consumer that stops iterating (client disconnect) aborts its request.

Callers never wait on the engine thread: adds and aborts go into an inbox that the loop drains
before each step, and each step's outputs reach an event loop in one callback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import defaultdict
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
        # ("add", request_id, prompt, params, priority, loop, future) | ("abort", request_id)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
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
        out_queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        added = loop.create_future()
        self._queues[request_id] = (loop, out_queue)
        self._post(("add", request_id, prompt, sampling_params, priority, loop, added))
        if self._error is not None:  # the loop died after the check above: nobody drains
            self._fail_inbox(self._error)
        try:
            await added
        except BaseException as e:
            self._queues.pop(request_id, None)
            if not isinstance(e, Exception):  # cancelled: the add may still land; the inbox is
                self.abort(request_id)  # in order, so this abort comes after it
            raise
        finished = False
        try:
            while not finished:
                out = await out_queue.get()
                if isinstance(out, BaseException):
                    raise EngineDeadError(str(out)) from out
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away: free its pages
                self.abort(request_id)

    @property
    def is_alive(self) -> bool:
        """False once the engine loop died (for /health)."""
        return self._error is None and self._thread.is_alive()

    def abort(self, request_id: str) -> None:
        """Abort before the next step; returns at once (safe from a cancelled task)."""
        self._post(("abort", request_id))

    def stats(self) -> SchedulerStats:
        """A snapshot for metrics, read without stopping the engine (counts may be one step
        apart from each other)."""
        return self.engine.scheduler.stats()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- engine thread ----------------------------------------------------------------------
    def _post(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "abort":
                self.engine.abort_request(message[1])
                continue
            _, request_id, prompt, params, priority, loop, added = message
            try:
                self.engine.add_request(request_id, prompt, params, priority=priority)
            except Exception as e:  # bad input or a full queue: the caller's error
                loop.call_soon_threadsafe(_settle, added, e)
            else:
                loop.call_soon_threadsafe(_settle, added, None)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._deliver(self.engine.step(delta=True))
        except Exception as e:  # a bug: fail every request in flight, loudly
            logger.exception("engine step failed")
            self._error = e
            for loop, out_queue in list(self._queues.values()):
                loop.call_soon_threadsafe(out_queue.put_nowait, e)
            self._fail_inbox(e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their event loops: one thread-safe call per loop."""
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for out in outputs:
            entry = self._queues.get(out.request_id)
            if entry is not None:
                batches[entry[0]].append((entry[1], out))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _fail_inbox(self, error: BaseException) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "add":
                message[5].call_soon_threadsafe(_settle, message[6], error)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for out_queue, out in batch:
        out_queue.put_nowait(out)
