"""OpenAI response shapes (plain dicts), built from the engine's `RequestOutput` deltas."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from engine.outputs import CompletionOutput, Logprob

# JSON has no -inf; OpenAI and vLLM report impossible tokens with this floor instead.
_LOGPROB_FLOOR = -9999.0


def clamp_logprob(value: float) -> float:
    return max(value, _LOGPROB_FLOOR)


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def envelope(request_id: str, obj: str, model: str, created: int) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": created, "model": model}


def now() -> int:
    return int(time.time())


def completion_logprobs(
    token_ids: list[int],
    entries: list[dict[int, Logprob] | None],
    decode: Callable[[int], str],
    text_offset: int,
) -> dict[str, list]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset.

    entries[i] is vLLM's dict for token i (None for the first prompt token, which has no logprob);
    top_logprobs holds the sampled token and the top-k, as in vLLM.
    """
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token_id, entry in zip(token_ids, entries, strict=True):
        chosen = entry.get(token_id) if entry else None
        token = chosen.decoded_token if chosen and chosen.decoded_token is not None else None
        token = decode(token_id) if token is None else token
        out["tokens"].append(token)
        out["token_logprobs"].append(None if chosen is None else clamp_logprob(chosen.logprob))
        out["top_logprobs"].append(
            None
            if entry is None
            else {lp.decoded_token: clamp_logprob(lp.logprob) for lp in entry.values()}
        )
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": clamp_logprob(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], k: int
) -> dict[str, list]:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [k of those]}]}."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token_id]
        top = sorted(
            (lp for lp in entry.values() if lp.rank is not None and lp.rank <= k),
            key=lambda lp: lp.rank,
        )[:k]
        item = _chat_token(chosen.decoded_token or "", chosen.logprob)
        item["top_logprobs"] = [_chat_token(lp.decoded_token or "", lp.logprob) for lp in top]
        content.append(item)
    return {"content": content}


@dataclasses.dataclass
class Choice:
    """One choice accumulated over the deltas of a non-streamed response."""

    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or ())
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
