"""`AsyncEngine`: an asyncio iterator of output deltas per request, for the server, over an
engine loop that runs in a thread (`AsyncEngine(config)`) or in its own process
(`AsyncEngine.in_process(...)`, what `pagejax serve` uses; see `engine/engine_core.py`).
A consumer that stops iterating (client disconnect) aborts its request.

Data parallelism (`in_process(..., data_parallel_size=N)`, vLLM's `--data-parallel-size`):
N engine processes, each with its own devices, weights, KV cache and scheduler. Each request
goes to the engine with the fewest requests in flight, and its abort follows it there.

Callers never wait on the engine: adds and aborts are messages the loop drains before each
step, and each step's outputs reach an event loop in one callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing.connection
import os
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.engine_core import EngineStartError, ProcessCore, ThreadCore
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
        self._cores: list[ThreadCore | ProcessCore] = [ThreadCore(engine, self)]

    @classmethod
    def in_process(
        cls, model: str | None, engine_kwargs: dict[str, Any], *, data_parallel_size: int = 1
    ) -> AsyncEngine:
        """The engine in a process of its own (`data_parallel_size` of them), built there from
        `build_engine_config(model, **engine_kwargs)`; returns once each has loaded and
        compiled. The tokenizer is loaded here meanwhile, for tokenizing prompts and templates
        on the server's side.

        The children are spawned: as with any `multiprocessing` spawn, a script calling this
        must guard its entry point with `if __name__ == "__main__":`."""
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        self = cls.__new__(cls)
        per_engine = engine_kwargs.get("tensor_parallel_size", 1)
        if data_parallel_size > 1:  # every engine's devices are checked before any starts
            envs = [data_parallel_env(r, per_engine) for r in range(data_parallel_size)]

        def start(rank: int) -> ProcessCore:
            if data_parallel_size == 1:
                return ProcessCore(model, engine_kwargs, self)
            kwargs = _rank_kwargs(engine_kwargs, rank)
            name = f"pagejax-engine-core-{rank}"
            return ProcessCore(model, kwargs, self, env=envs[rank], name=name)

        cores = [start(0)]
        try:
            tokenizer = None
            if not engine_kwargs.get("skip_tokenizer_init"):
                from models.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(model)
            if data_parallel_size > 1:  # engine 0's platform first: on a TPU, no others
                cores[0].receive_startup()  # its platform: the child sends that first
                _check_platforms({0: cores[0].platform}, data_parallel_size)
                cores += [start(rank) for rank in range(1, data_parallel_size)]
            _await_ready(cores)
        except BaseException:
            for core in cores:
                core.terminate()
            raise
        config = cores[0].config
        self._setup(config, tokenizer, InputProcessor(
            tokenizer, config.scheduler.max_model_len, cores[0].vocab_size
        ))  # fmt: skip
        self._cores = cores
        self._load = [0] * len(cores)
        for core in cores:
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
        self._owner: dict[str, int] = {}  # request id -> the engine (index) that runs it
        self._load = [0]  # requests in flight per engine
        self._routing = threading.Lock()  # generate may run on several event loops

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
        with self._routing:
            rank = min(range(len(self._load)), key=self._load.__getitem__)  # the least busy
            self._owner[request_id] = rank
            self._load[rank] += 1
        self._cores[rank].post(("add", request_id, prompt, sampling_params, priority))
        if self._error is not None and not added.done():  # died meanwhile: nobody answers
            added.set_exception(EngineDeadError(str(self._error)))
        try:
            await added
        except BaseException as e:
            self._queues.pop(request_id, None)
            self._adding.pop(request_id, None)
            # Cancelled, or another engine died: the add may still land (on an engine that
            # lives on). Messages are applied in order, so this abort comes after it.
            if not isinstance(e, Exception) or isinstance(e, EngineDeadError):
                self.abort(request_id)
            self._release(request_id)
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
            self._release(request_id)

    @property
    def is_alive(self) -> bool:
        """False once an engine loop died (for /health)."""
        return self._error is None and all(core.is_alive() for core in self._cores)

    def abort(self, request_id: str) -> None:
        """Abort before the next step; returns at once (safe from a cancelled task)."""
        rank = self._owner.get(request_id)
        if rank is not None:  # else finished already, or never added
            self._cores[rank].post(("abort", request_id))

    def stats(self) -> list[SchedulerStats]:
        """Each engine's running/waiting counts and KV-cache usage as of its latest step, in
        data-parallel rank order (for metrics)."""
        return [core.stats() for core in self._cores]

    def shutdown(self) -> None:
        for core in self._cores:  # all at once, then wait for each
            core.stop()
        for core in self._cores:
            core.shutdown()

    def _release(self, request_id: str) -> None:
        with self._routing:
            rank = self._owner.pop(request_id, None)
            if rank is not None:
                self._load[rank] -= 1

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


def data_parallel_env(rank: int, per_engine: int, environ=os.environ) -> dict[str, str]:
    """The variables that give data-parallel engine `rank` its own GPUs: the rank-th group of
    `per_engine` (its tensor-parallel size) of the GPUs this process may use
    (`CUDA_VISIBLE_DEVICES`, else all). jax in each engine then sees only its own and takes
    its memory pool on those alone. None where the GPUs are hidden or JAX is kept off them:
    on the CPU every process has devices of its own anyway."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
        return {}
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return {}
    first = rank * per_engine
    if visible is None:
        ids = [str(i) for i in range(first, first + per_engine)]
    else:
        names = [v for v in visible.split(",") if v.strip()]
        ids = names[first : first + per_engine]
        if len(ids) < per_engine:
            raise ValueError(
                f"data-parallel engine {rank} needs GPUs {first}-{first + per_engine - 1} of "
                f"CUDA_VISIBLE_DEVICES={visible!r}, which names {len(names)}"
            )
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}


def _rank_kwargs(engine_kwargs: dict[str, Any], rank: int) -> dict[str, Any]:
    """One data-parallel engine's settings: its own step trace file (`steps.jsonl` ->
    `steps.dp1.jsonl`)."""
    kwargs = dict(engine_kwargs)
    if kwargs.get("step_trace_path"):
        path = Path(kwargs["step_trace_path"])
        kwargs["step_trace_path"] = str(path.with_name(f"{path.stem}.dp{rank}{path.suffix}"))
    return kwargs


def _await_ready(cores: list[ProcessCore]) -> None:
    """Take the engines' start-up messages as they come (a failure at once, not after the
    others have compiled), checking each platform as it is named."""
    pending = {core.startup_connection: core for core in cores if core.config is None}
    while pending:
        for connection in multiprocessing.connection.wait(list(pending)):
            if pending[connection].receive_startup():
                del pending[connection]
            named = {rank: core.platform for rank, core in enumerate(cores) if core.platform}
            _check_platforms(named, len(cores))


def _check_platforms(platforms: dict[int, str], data_parallel_size: int) -> None:
    """The data-parallel engines that have named their JAX platform (rank -> platform) must
    all run on one: an engine left without a GPU would fall back to the CPU. TPU hosts need
    settings per process that are not built."""
    if data_parallel_size > 1 and "tpu" in platforms.values():
        raise EngineStartError("data parallelism is not built for TPUs: use one engine")
    first = min(platforms, default=None)
    for rank, platform in platforms.items():
        if platform != platforms[first]:
            raise EngineStartError(
                f"data-parallel engine {rank} runs on {platform}, engine {first} on "
                f"{platforms[first]}: fewer devices than data_parallel_size x "
                "tensor_parallel_size?"
            )


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
