"""From the scheduler's `RequestUpdate`s to user-facing `RequestOutput`s: detokenization, stop
strings, logprobs in vLLM's shape, and the fan-in of `n > 1` completions into one output."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, OutputKind, RequestOutput, to_logprob_dict
from engine.sampling_params import SamplingParams
from engine.types import RequestUpdate


@dataclasses.dataclass
class _Completion:
    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0
    final_sent: bool = False  # delta mode: the finishing delta went out


@dataclasses.dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    prompt_sent: bool = False  # with `prompt_once`: an output carried the prompt

    @property
    def finished(self) -> bool:
        completions = self.completions
        if len(completions) == 1:  # the common case, twice per request per step
            return completions[0].finish_reason is not None
        return all(c.finish_reason is not None for c in completions)


def child_id(request_id: str, index: int, n: int) -> str:
    """Engine-level id of completion `index` (the request's own id when n == 1)."""
    return request_id if n == 1 else f"{index}_{request_id}"


class OutputProcessor:
    """Owns per-request output state; `process` returns the outputs of requests that changed.

    prompt_once: a request's prompt (text and ids) goes out with its first output only, later
    ones carry None. The engine process sets it: pickling a 1,024-token prompt with every delta
    cost more than the step's own host work, and `AsyncEngine.generate` puts it back."""

    def __init__(self, tokenizer: Any | None, *, prompt_once: bool = False):
        self.tokenizer = tokenizer
        self.prompt_once = prompt_once
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, _Completion]] = {}
        self._decode_one = (
            (lambda t: tokenizer.decode([t])) if tokenizer is not None else (lambda t: None)
        )

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> list[str]:
        """Register a request; returns the engine-level ids of its `n` completions."""
        completions = []
        for i in range(params.n):
            detok = (
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
                if self.tokenizer is not None
                else None
            )
            completions.append(
                _Completion(
                    i,
                    detok,
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                )
            )
        parent = _Parent(
            request_id,
            prompt,
            prompt_token_ids,
            params,
            completions,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        self._parents[request_id] = parent
        ids = [child_id(request_id, i, params.n) for i in range(params.n)]
        for cid, comp in zip(ids, completions, strict=True):
            self._children[cid] = (parent, comp)
        return ids

    def has(self, request_id: str) -> bool:
        return request_id in self._parents

    def child_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return (
            []
            if parent is None
            else [child_id(request_id, c.index, parent.params.n) for c in parent.completions]
        )

    def process(
        self,
        updates: list[RequestUpdate],
        *,
        kind: OutputKind,
        num_cached: dict[str, int] | None = None,
    ) -> tuple[list[RequestOutput], list]:
        """Apply updates. Returns (outputs of the changed requests, or with FINAL_ONLY of the
        finished ones; [(child id, stop string)] of completions a stop string finished, which
        the scheduler must finish too). FINAL_ONLY builds no output for a running request: at
        a thousand running requests that is most of the host's work per step."""
        changed: dict[str, _Parent] = {}
        stopped = []
        for up in updates:
            entry = self._children.get(up.request_id)
            if entry is None:
                continue
            parent, comp = entry
            if up.new_prompt_logprobs and parent.prompt_logprobs is not None and comp.index == 0:
                parent.prompt_logprobs += [
                    to_logprob_dict(e, self._decode_one) for e in up.new_prompt_logprobs
                ]
            if num_cached and up.request_id in num_cached:
                parent.num_cached_tokens = num_cached[up.request_id]
            self._apply(comp, up, stopped, up.request_id)
            changed[parent.request_id] = parent
        delta = kind == OutputKind.DELTA
        outputs = []
        for p in changed.values():
            finished = p.finished
            if finished or kind != OutputKind.FINAL_ONLY:
                outputs.append(self._output(p, delta))
            if finished:
                self._forget(p)
        return outputs, stopped

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish every completion of the request with "abort"; returns its final output."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for comp in parent.completions:
            if comp.finish_reason is None:
                comp.finish_reason = "abort"
        out = self._output(parent, delta=True)
        self._forget(parent)
        return out

    def _apply(self, comp: _Completion, up: RequestUpdate, stopped: list, cid: str) -> None:
        if comp.finish_reason is not None:
            return
        comp.token_ids.extend(up.new_token_ids)
        for e in up.new_logprobs:
            comp.logprobs.append(to_logprob_dict(e, self._decode_one))
            comp.cumulative_logprob += e.logprob
        if comp.detokenizer is not None:
            stop_terminated = up.finished and up.finish_reason == "stop"
            stop_str = comp.detokenizer.update(up.new_token_ids, stop_terminated)
            if stop_str is not None and not up.finished:
                comp.finish_reason, comp.stop_reason = "stop", stop_str
                stopped.append((cid, stop_str))
                return
        if up.finished:
            comp.finish_reason, comp.stop_reason = up.finish_reason, up.stop_reason

    def _output(self, parent: _Parent, delta: bool) -> RequestOutput:
        outs = []
        for comp in parent.completions:
            finished = comp.finish_reason is not None
            text = (
                comp.detokenizer.get_output_text(finished, delta)
                if comp.detokenizer is not None
                else ""
            )
            tokens, logprobs = comp.token_ids, comp.logprobs
            if delta:
                tokens = tokens[comp.num_sent_tokens :]
                logprobs = None if logprobs is None else logprobs[comp.num_sent_logprobs :]
                if (not tokens and not text and not finished) or comp.final_sent:
                    continue
                comp.final_sent = finished
                comp.num_sent_tokens = len(comp.token_ids)
                comp.num_sent_logprobs = len(comp.logprobs or [])
            outs.append(
                CompletionOutput(
                    comp.index,
                    text,
                    list(tokens),
                    comp.cumulative_logprob,
                    logprobs,
                    comp.finish_reason,
                    comp.stop_reason,
                )
            )
        prompt, prompt_token_ids = parent.prompt, parent.prompt_token_ids
        if self.prompt_once:
            if parent.prompt_sent:
                prompt = prompt_token_ids = None
            parent.prompt_sent = True
        return RequestOutput(
            parent.request_id,
            prompt,
            prompt_token_ids,
            parent.prompt_logprobs,
            outs,
            parent.finished,
            parent.num_cached_tokens,
        )

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for comp in parent.completions:
            self._children.pop(child_id(parent.request_id, comp.index, parent.params.n), None)
