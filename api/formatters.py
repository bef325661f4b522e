"""The two OpenAI response shapes: `text_completion` and `chat.completion` (and their chunks).

A formatter receives the `(prompt index, RequestOutput delta)`s of one call, either all of them
(`add`, then `response()`) or one at a time as stream chunks (`stream_start`, `chunks`,
`stream_end`).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from api import responses as R
from api.generation import Prompt
from api.protocol import ChatCompletionRequest, CompletionRequest
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams


class _Base:
    prefix = ""
    obj = ""

    def __init__(self, n: int, include_usage: bool, model: str, num_prompt_tokens: int):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = R.now()
        self.n, self.include_usage, self.model = n, include_usage, model
        self.num_prompt_tokens = num_prompt_tokens
        self.num_tokens = 0
        self.choices: dict[int, R.Choice] = {}

    def _envelope(self, obj: str) -> dict[str, Any]:
        return R.envelope(self.id, obj, self.model, self.created)

    def _chunk(self, choices: list[dict]) -> dict[str, Any]:
        chunk = {**self._envelope(self.obj + ("" if self.obj == "text_completion" else ".chunk"))}
        chunk["choices"] = choices
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def add(self, i: int, out: RequestOutput) -> None:
        for c in out.outputs:
            self.choices.setdefault(i * self.n + c.index, R.Choice()).add(c)
            self.num_tokens += len(c.token_ids)

    def usage(self) -> dict[str, int]:
        return R.usage(self.num_prompt_tokens, self.num_tokens)

    def stream_start(self) -> list[dict]:
        return []

    def stream_end(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self._chunk([]), "usage": self.usage()}]


class CompletionFormatter(_Base):
    prefix, obj = "cmpl", "text_completion"

    def __init__(
        self,
        req: CompletionRequest,
        params: SamplingParams,
        prompts: list[Prompt],
        model: str,
        tokenizer: Any,
    ):
        super().__init__(params.n, req.include_usage, model, sum(len(p.token_ids) for p in prompts))
        self.req, self.prompts, self.tokenizer = req, prompts, tokenizer
        self.prompt_logprobs: dict[int, list | None] = {}
        self.offsets: dict[int, int] = {}  # text offset of each streamed choice so far

    def add(self, i: int, out: RequestOutput) -> None:
        super().add(i, out)
        self.prompt_logprobs[i] = out.prompt_logprobs

    def _echo(self, i: int, prompt_logprobs: list | None) -> tuple[str, list[int], list]:
        """Text, token ids and logprob entries the choice starts with (echo), else nothing."""
        if not self.req.echo:
            return "", [], []
        p = self.prompts[i]
        text = p.text if p.text is not None else self.tokenizer.decode(p.token_ids)
        return text, p.token_ids, prompt_logprobs or [None] * len(p.token_ids)

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, token_ids: list[int], entries: list, offset: int) -> dict | None:
        if self.req.logprobs is None:
            return None
        return R.completion_logprobs(token_ids, entries, self.decode, offset)

    def response(self) -> dict[str, Any]:
        choices = []
        for idx, ch in sorted(self.choices.items()):
            i = idx // self.n
            echo_text, echo_ids, echo_lps = self._echo(i, self.prompt_logprobs.get(i))
            choice = {
                "index": idx,
                "text": echo_text + "".join(ch.text),
                "logprobs": self._logprobs(echo_ids + ch.token_ids, echo_lps + ch.logprobs, 0),
                "finish_reason": ch.finish_reason,
                "stop_reason": ch.stop_reason,
            }
            if self.req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _plain_logprobs(self.prompt_logprobs.get(i))
            choices.append(choice)
        return {**self._envelope(self.obj), "choices": choices, "usage": self.usage()}

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        choices = []
        for c in out.outputs:
            idx = i * self.n + c.index
            self.num_tokens += len(c.token_ids)
            text, ids, lps = "", [], []
            if idx not in self.offsets:  # the choice's first chunk carries the echo
                text, ids, lps = self._echo(i, out.prompt_logprobs)
                self.offsets[idx] = 0
            lp = self._logprobs(ids + c.token_ids, lps + (c.logprobs or []), self.offsets[idx])
            if lp is not None:
                self.offsets[idx] += sum(len(t) for t in lp["tokens"])
            choices.append(_choice_chunk(idx, {"text": text + c.text}, lp, c))
        return [self._chunk(choices)]


class ChatFormatter(_Base):
    prefix, obj = "chatcmpl", "chat.completion"

    def __init__(
        self, req: ChatCompletionRequest, params: SamplingParams, prompt: Prompt, model: str
    ):
        super().__init__(params.n, req.include_usage, model, len(prompt.token_ids))
        self.top_k = params.logprobs if req.logprobs else None

    def _logprobs(self, token_ids: list[int], entries: list | None) -> dict | None:
        if self.top_k is None:
            return None
        return R.chat_logprobs(token_ids, entries or [], self.top_k)

    def response(self) -> dict[str, Any]:
        choices = [
            {
                "index": idx,
                "message": {"role": "assistant", "content": "".join(ch.text)},
                "logprobs": self._logprobs(ch.token_ids, ch.logprobs),
                "finish_reason": ch.finish_reason,
                "stop_reason": ch.stop_reason,
            }
            for idx, ch in sorted(self.choices.items())
        ]
        return {**self._envelope(self.obj), "choices": choices, "usage": self.usage()}

    def stream_start(self) -> list[dict]:
        # As OpenAI: a first chunk per choice that carries the role.
        return [
            self._chunk([_choice_chunk(i, {"role": "assistant", "content": ""}, None, None)])
            for i in range(self.n)
        ]

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        choices = []
        for c in out.outputs:
            self.num_tokens += len(c.token_ids)
            delta = {"content": c.text} if c.text or not c.finished() else {}
            lp = self._logprobs(c.token_ids, c.logprobs)
            choices.append(_choice_chunk(c.index, delta, lp, c))
        return [self._chunk(choices)]


def _choice_chunk(
    index: int, body: dict, logprobs: dict | None, c: CompletionOutput | None
) -> dict[str, Any]:
    key = "text" if "text" in body else "delta"
    return {
        "index": index,
        key: body["text"] if key == "text" else body,
        "logprobs": logprobs,
        "finish_reason": None if c is None else c.finish_reason,
        "stop_reason": None if c is None else c.stop_reason,
    }


def _plain_logprobs(entries: list | None) -> list | None:
    """vLLM's prompt_logprobs field: per position None or {token_id: {logprob, rank, ...}}."""
    if entries is None:
        return None
    return [
        None
        if e is None
        else {
            str(t): {**dataclasses.asdict(lp), "logprob": R.clamp_logprob(lp.logprob)}
            for t, lp in e.items()
        }
        for e in entries
    ]
