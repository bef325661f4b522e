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
import os
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
        if data_parallel_size == 1:
            cores = [ProcessCore(model, engine_kwargs, self)]
        else:  # every engine's devices are checked before any starts
            envs = [data_parallel_env(r, per_engine) for r in range(data_parallel_size)]
            cores = [
                ProcessCore(
                    model,
                    _rank_kwargs(engine_kwargs, r),
                    self,
                    env=env,
                    name=f"pagejax-engine-core-{r}",
                )
                for r, env in enumerate(envs)
            ]
        try:
            tokenizer = None
            if not engine_kwargs.get("skip_tokenizer_init"):
                from models.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(model)
            for rank, core in enumerate(cores):
                core.wait_ready()
                _check_platforms([c.platform for c in cores[: rank + 1]], len(cores))
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
            if not isinstance(e, Exception):  # cancelled: the add may still land; messages
                self.abort(request_id)  # are applied in order, so this abort comes after it
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

    def stats(self) -> SchedulerStats:
        """Running/waiting counts and KV-cache usage as of the latest step, summed over the
        engines (page usage: their mean)."""
        each = self.stats_per_engine()
        if len(each) == 1:
            return each[0]
        return SchedulerStats(
            num_running=sum(s.num_running for s in each),
            num_waiting=sum(s.num_waiting for s in each),
            num_preemptions=sum(s.num_preemptions for s in each),
            num_cached_tokens=sum(s.num_cached_tokens for s in each),
            num_aborted=sum(s.num_aborted for s in each),
            page_usage=sum(s.page_usage for s in each) / len(each),
        )

    def stats_per_engine(self) -> list[SchedulerStats]:
        """`stats()` of each engine, in data-parallel rank order (for metrics)."""
        return [core.stats() for core in self._cores]

    def shutdown(self) -> None:
        for core in self._cores:
            core.shutdown()

    def _release(self, request_id: str) -> None:
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
    its memory pool on those alone. On the CPU every process has devices of its own anyway."""
    first = rank * per_engine
    visible = environ.get("CUDA_VISIBLE_DEVICES")
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


def _check_platforms(platforms: list[str], data_parallel_size: int) -> None:
    """Every data-parallel engine (those ready so far) must run where the first does: one
    left without a GPU would fall back to the CPU. TPU hosts need settings per process that
    are not built."""
    if data_parallel_size > 1 and platforms[0] == "tpu":
        raise EngineStartError("data parallelism is not built for TPUs: use one engine")
    for rank, platform in enumerate(platforms):
        if platform != platforms[0]:
            raise EngineStartError(
                f"data-parallel engine {rank} runs on {platform}, engine 0 on {platforms[0]}: "
                "fewer devices than data_parallel_size x tensor_parallel_size?"
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
