"""Request state and the contracts between scheduler and runner (no JAX here).

`Request` is the scheduler's mutable record of one request. `SchedulerOutput` (scheduler ->
runner) and `StepOutput` (runner -> scheduler) are frozen: they are the only data crossing that
boundary each step. `RequestUpdate` is what `Scheduler.update` hands to output processing.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life. The FINISHED_* values carry the OpenAI finish reason."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # back in the waiting queue after its pages were taken
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH_CAPPED = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        """True for the three FINISHED_* states."""
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style finish reason ("stop", "length", "abort"), None while unfinished."""
        return self.value if self.is_finished else None

    @staticmethod
    def from_finish_reason(reason: str) -> RequestStatus:
        """The FINISHED_* status for "stop", "length" or "abort"."""
        for status in _FINISHED:
            if status.value == reason:
                return status
        raise ValueError(f"unknown finish reason {reason!r}")


_FINISHED = (
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH_CAPPED,
    RequestStatus.FINISHED_ABORTED,
)


@dataclass(eq=False)
class Request:
    """One request as the scheduler tracks it (mutable; owned by the scheduler).

    The tokens whose KV is in the cache are `all_token_ids[:num_computed_tokens]`; the pages
    holding them are `page_ids`, in order. After preemption `num_computed_tokens` is back to 0 and
    the output tokens so far are recomputed together with the prompt.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    eos_token_id: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    page_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prefix-cache hits at first scheduling (vLLM's meaning)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_logprobs_sent: int = 0  # prompt positions already reported (recompute repeats)
    # Tokens sampled by steps still on the device (async scheduling): the request's next step
    # reads them there, so the host can schedule it before they come back.
    num_inflight: int = 0
    # Prompt plus the most output tokens it may get (set by the scheduler when added).
    max_total_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens known so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by output tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """`all_token_ids[start:stop]` without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        head = self.prompt_token_ids[start:stop] if start < num_prompt else []
        tail = self.output_token_ids[max(start - num_prompt, 0) : max(stop - num_prompt, 0)]
        return head + tail


@dataclass(slots=True)
class ScheduledRequest:
    """One request's work in a step (read-only once built; not `frozen`, because a frozen
    dataclass costs 2.3 us to build against 0.5 us, per request and step).

    token_ids: the tokens to compute now, at positions start_position + i: a prompt chunk, the
        last output token (decode), or prompt+outputs being recomputed after preemption.
    page_ids: all pages of the request, covering positions [0, start_position + len(token_ids)).
    sample: this step reaches the request's last known token, so the runner samples a next one.
    num_prompt_tokens: where prompt ends and output begins (penalties treat them differently).
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    page_ids: tuple[int, ...]
    sample: bool
    num_prompt_tokens: int
    sampling_params: SamplingParams
    # The prompt token right after this chunk (-1 if none), which the chunk's last position
    # scores for prompt logprobs.
    next_prompt_token_id: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """The whole step, in batch order: the only thing the runner reads from the scheduler.

    finished_request_ids: finished or aborted since the previous step, and preempted_request_ids:
    preempted by this step; the runner drops any per-request state it keeps for both, before
    handling `requests` (a preempted request comes back later as new, at start_position 0 or
    at its prefix-cache hit; a finished id may be reused by a new request).
    """

    requests: tuple[ScheduledRequest, ...]
    num_batched_tokens: int
    finished_request_ids: frozenset[str] = frozenset()
    preempted_request_ids: frozenset[str] = frozenset()

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one position: of the chosen token and of the top-k.

    token_rank is 1-based (1 = most likely). top_token_ids/top_logprobs: [k], best first.
    """

    token_id: int
    logprob: float
    token_rank: int
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """What the runner returns for a `SchedulerOutput`.

    sampled_token_ids: [R], aligned with `SchedulerOutput.requests`; entries of requests that did
        not sample are ignored (use -1). A numpy array's `.tolist()` fits.
    logprobs: [R] or None; entry i is set when request i sampled and asked for logprobs.
    prompt_logprobs: request id -> one entry per computed position p of this step's chunk with
        p + 1 < num_prompt_tokens (the logprob of prompt token p + 1), in order.
    """

    sampled_token_ids: Sequence[int]
    logprobs: Sequence[TokenLogprobs | None] | None = None
    prompt_logprobs: Mapping[str, Sequence[TokenLogprobs]] = field(default_factory=dict)


@dataclass(slots=True)
class RequestUpdate:
    """One request's news from a step (`Scheduler.update`), before detokenization; read-only
    (not `frozen`, for the cost of building one per request and step)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: tuple[TokenLogprobs, ...] = ()
    new_prompt_logprobs: tuple[TokenLogprobs, ...] = ()
