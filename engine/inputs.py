"""Prompt -> token ids, and the checks that turn a request away before it is scheduled. Used by
`LLMEngine`, and by a server whose engine runs in another process (`engine/engine_core.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.sampling_params import SamplingParams

PromptType = str | Sequence[int] | dict


class InputProcessor:
    def __init__(self, tokenizer: Any | None, max_model_len: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a text, token ids, or {"prompt", "prompt_token_ids"}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (skip_tokenizer_init is set)")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Reject what can never run (ValueError), before anything is scheduled."""
        limit, vocab = self.max_model_len, self.vocab_size
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= limit:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but max_model_len is "
                f"{limit} (the prompt must leave room for at least one new token)"
            )
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.logit_bias and any(not 0 <= int(t) < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias has a token id outside the vocabulary [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids has an id outside the vocabulary [0, {vocab})")
