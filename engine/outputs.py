"""User-facing results with vLLM's names: `RequestOutput`, `CompletionOutput`, `Logprob`."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from engine.types import TokenLogprobs


@dataclass(frozen=True)
class Logprob:
    """Log-probability of one candidate token (vLLM's `Logprob`); rank is 1-based."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class OutputKind(enum.Enum):
    """Which outputs an engine step returns (vLLM's `RequestOutputKind`)."""

    CUMULATIVE = 0  # every request that changed, with everything so far
    DELTA = 1  # every request that changed, with only what is new (streaming)
    FINAL_ONLY = 2  # finished requests only, with everything (offline `LLM.generate`)


# vLLM's shapes: one dict per generated token; prompt ones start with None (no first-token logprob).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


def to_logprob_dict(entry: TokenLogprobs, decode: Callable[[int], str]) -> dict[int, Logprob]:
    """vLLM's per-position dict: the chosen token first, then the top-k ones not already in.

    decode: token id -> its text (e.g. `lambda t: tokenizer.decode([t])`).
    """
    out = {entry.token_id: Logprob(entry.logprob, entry.token_rank, decode(entry.token_id))}
    for rank, (token_id, logprob) in enumerate(
        zip(entry.top_token_ids, entry.top_logprobs, strict=True), start=1
    ):
        if token_id not in out:
            out[token_id] = Logprob(logprob, rank, decode(token_id))
    return out


@dataclass(frozen=True)
class CompletionOutput:
    """One of the `n` completions of a request (vLLM's `CompletionOutput`).

    In a streamed delta, text/token_ids/logprobs hold only what is new since the last output.
    Lists, not tuples, so results compare equal to vLLM's.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """True once a finish reason is set (a method, as in vLLM)."""
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    """What `LLM.generate` returns and `AsyncEngine.generate` streams (vLLM's `RequestOutput`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None

    def with_prompt(self, prompt: str | None, prompt_token_ids: list[int]) -> RequestOutput:
        """This output with the given prompt (cheaper than `dataclasses.replace`)."""
        return RequestOutput(
            self.request_id,
            prompt,
            prompt_token_ids,
            self.prompt_logprobs,
            self.outputs,
            self.finished,
            self.num_cached_tokens,
        )


def merge_deltas(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive streamed deltas of one request as one (what a consumer that fell behind
    reads: one chunk with both steps' tokens instead of two)."""
    completions = {c.index: c for c in first.outputs}
    for c in later.outputs:
        prev = completions.get(c.index)
        if prev is None:
            completions[c.index] = c
            continue
        logprobs = None
        if prev.logprobs is not None or c.logprobs is not None:
            logprobs = [*(prev.logprobs or []), *(c.logprobs or [])]
        completions[c.index] = CompletionOutput(
            c.index,
            prev.text + c.text,
            [*prev.token_ids, *c.token_ids],
            c.cumulative_logprob,
            logprobs,
            c.finish_reason,
            c.stop_reason,
        )
    return RequestOutput(
        later.request_id,
        later.prompt,
        later.prompt_token_ids,
        later.prompt_logprobs if later.prompt_logprobs is not None else first.prompt_logprobs,
        list(completions.values()),
        later.finished,
        later.num_cached_tokens,
    )
