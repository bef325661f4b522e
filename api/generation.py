"""The engine requests of one API call (one per prompt), merged into one stream of
`(prompt index, RequestOutput delta)`, timed for metrics, and aborted if the call ends early."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Sequence

from api.metrics import Metrics
from api.protocol import APIError
from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput, merge_deltas
from engine.sampling_params import SamplingParams
from engine.scheduler import QueueFullError


@dataclasses.dataclass
class Prompt:
    """One prompt, tokenized: `text` is None for a prompt given as token ids."""

    text: str | None
    token_ids: list[int]


@dataclasses.dataclass
class _Timing:
    start: float
    first_token: float | None = None
    num_tokens: int = 0
    finish_reasons: list[str] = dataclasses.field(default_factory=list)


class Generation:
    """Starts one engine request per prompt at construction (inside a running event loop).

    Iterate with `next()`; always call `close()` (it aborts whatever has not finished, without
    waiting, so it also works from a cancelled task).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        priority: int = 0,
        metrics: Metrics | None = None,
    ):
        self._engine = engine
        self._metrics = metrics
        self.ids = [
            request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))
        ]
        self._items: deque[tuple[int, RequestOutput | Exception]] = deque()
        self._ready = asyncio.Event()  # set while _items is not empty
        self._open = set(range(len(prompts)))
        self._timings = [_Timing(time.monotonic()) for _ in prompts]
        self._tasks = [
            asyncio.create_task(self._pump(i, p, params, priority)) for i, p in enumerate(prompts)
        ]

    async def _pump(self, i: int, prompt: Prompt, params: SamplingParams, priority: int) -> None:
        engine_prompt = {"prompt": prompt.text, "prompt_token_ids": prompt.token_ids}
        try:
            async for out in self._engine.generate(
                engine_prompt, params, self.ids[i], priority=priority
            ):
                self._push(i, out)
        except Exception as e:  # handed to the consumer, which turns it into an HTTP error
            self._push(i, e)

    def _push(self, i: int, item: RequestOutput | Exception) -> None:
        self._items.append((i, item))
        self._ready.set()

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next delta of any prompt; None when all have finished. Raises APIError.

        Deltas of the same prompt that queued up meanwhile come merged (one chunk, not many,
        when the client or this server falls behind the engine)."""
        while self._open:
            while not self._items:
                self._ready.clear()
                await self._ready.wait()
            i, item = self._items.popleft()
            if isinstance(item, Exception):
                self._open.discard(i)
                raise engine_error(item)
            while self._items and self._items[0][0] == i:
                later = self._items[0][1]
                if isinstance(later, Exception):
                    break
                self._items.popleft()
                item = merge_deltas(item, later)
            self._observe(i, item)
            if item.finished:
                self._open.discard(i)
            return i, item
        return None

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for i in self._open:  # returns at once: the caller may be a task being cancelled
            self._engine.abort(self.ids[i])
        self._open.clear()

    def _observe(self, i: int, out: RequestOutput) -> None:
        timing, now = self._timings[i], time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        if timing.first_token is None and new_tokens:
            timing.first_token = now
        timing.num_tokens += new_tokens
        timing.finish_reasons += [c.finish_reason for c in out.outputs if c.finish_reason]
        if out.finished and self._metrics is not None:
            self._metrics.observe_finished(
                num_prompt_tokens=len(out.prompt_token_ids),
                num_tokens=timing.num_tokens,
                ttft=(timing.first_token or now) - timing.start,
                e2e=now - timing.start,
                finish_reasons=timing.finish_reasons,
            )


def engine_error(e: Exception) -> APIError:
    """An engine exception as the client sees it; internals never leave the server."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(
            f"The server is overloaded: {e} Retry later.",
            503,
            type="server_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, ValueError):
        return APIError(str(e))
    raise e  # a bug: the app's last-resort handler logs it and answers a bare 500
