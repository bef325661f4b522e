"""`AsyncEngine`: an asyncio iterator of output deltas per request, for the server, over an
engine loop that runs in a thread (`AsyncEngine(config)`) or in its own process
(`AsyncEngine.in_process(...)`, what `pagejax serve` uses; see `engine/engine_core.py`).
A consumer that stops iterating (client disconnect) aborts its request.

Callers never wait on the engine: adds and aborts are messages the loop drains before each
step, and each step's outputs reach an event loop in one callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from engine.config import EngineConfig
from engine.engine_core import ProcessCore, ThreadCore
from engine.inputs import InputProcessor, PromptType
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerStats

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests in flight cannot finish."""


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, *, engine: LLMEngine | None = None):
        """The engine loop in a thread of this process (tests, embedding)."""
        engine = engine if engine is not None else LLMEngine(config)
        self._setup(engine.config, engine.tokenizer, engine.inputs)
        self._core: ThreadCore | ProcessCore = ThreadCore(engine, self)

    @classmethod
    def in_process(cls, model: str | None, engine_kwargs: dict[str, Any]) -> AsyncEngine:
        """The engine in a process of its own, built there from `build_engine_config(model,
        **engine_kwargs)`; returns once it has loaded and compiled. The tokenizer is loaded
        here meanwhile, for tokenizing prompts and templates on the server's side.

        The child is spawned: as with any `multiprocessing` spawn, a script calling this must
        guard its entry point with `if __name__ == "__main__":`."""
        self = cls.__new__(cls)
        core = ProcessCore(model, engine_kwargs, self)
        tokenizer = None
        if not engine_kwargs.get("skip_tokenizer_init"):
            from models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model)
        core.wait_ready()
        config = core.config
        self._setup(config, tokenizer, InputProcessor(
            tokenizer, config.scheduler.max_model_len, core.vocab_size
        ))  # fmt: skip
        self._core = core
        core.start()  # reports may come from now on
        return self

    def _setup(self, config: EngineConfig, tokenizer, inputs: InputProcessor) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.inputs = inputs
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._adding: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None

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
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        out_queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        added = loop.create_future()
        self._queues[request_id] = (loop, out_queue)
        self._adding[request_id] = (loop, added)
        self._core.post(("add", request_id, prompt, sampling_params, priority))
        if self._error is not None and not added.done():  # died meanwhile: nobody answers
            added.set_exception(EngineDeadError(str(self._error)))
        try:
            await added
        except BaseException as e:
            self._queues.pop(request_id, None)
            self._adding.pop(request_id, None)
            if not isinstance(e, Exception):  # cancelled: the add may still land; messages
                self.abort(request_id)  # are applied in order, so this abort comes after it
            raise
        finished = False
        prompt_text = prompt_ids = None
        try:
            while not finished:
                out = await out_queue.get()
                if isinstance(out, BaseException):
                    raise EngineDeadError(str(out)) from out
                if out.prompt_token_ids is None:  # an engine process sends it once, first
                    out = out.with_prompt(prompt_text, prompt_ids)
                else:
                    prompt_text, prompt_ids = out.prompt, out.prompt_token_ids
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away: free its pages
                self.abort(request_id)

    @property
    def is_alive(self) -> bool:
        """False once the engine loop died (for /health)."""
        return self._error is None and self._core.is_alive()

    def abort(self, request_id: str) -> None:
        """Abort before the next step; returns at once (safe from a cancelled task)."""
        self._core.post(("abort", request_id))

    def stats(self) -> SchedulerStats:
        """Running/waiting counts and KV-cache usage as of the latest step, for metrics."""
        return self._core.stats()

    def shutdown(self) -> None:
        self._core.shutdown()

    # -- CoreSink: called from the core's thread ----------------------------------------------
    def added(self, request_id: str, error: BaseException | None) -> None:
        entry = self._adding.pop(request_id, None)
        if entry is not None:
            _call(entry[0], _settle, entry[1], error)

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their event loops: one thread-safe call per loop."""
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for out in outputs:
            entry = self._queues.get(out.request_id)
            if entry is not None:
                batches[entry[0]].append((entry[1], out))
        for loop, batch in batches.items():
            _call(loop, _put_all, batch)

    def died(self, error: BaseException) -> None:
        self._error = error
        for loop, added in list(self._adding.values()):
            _call(loop, _settle, added, EngineDeadError(str(error)))
        for loop, out_queue in list(self._queues.values()):
            _call(loop, out_queue.put_nowait, error)


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run `fn(*args)` on `loop` from another thread; a closed loop (its caller is gone) is
    skipped, not an error in the engine's thread."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


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
