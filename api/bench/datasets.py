"""The `random` dataset of `bench serve`: prompts of random tokens with lengths drawn as vLLM's
random dataset draws them (uniform integers in [len * (1 - r), len * (1 + r)]).

With a tokenizer the ids are decoded to text and re-encoded, adjusting until the text is
`prompt_len` tokens long (as vLLM's `gen_prompt_decode_to_target_len`); without one the prompt is
the token id list itself, which the OpenAI completions API accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Decode/re-encode rounds before accepting a prompt whose length is off by a token or two.
_MAX_ADJUST_ROUNDS = 10


@dataclass(frozen=True)
class SampleRequest:
    """One request to send: its prompt and the lengths it was drawn with."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int


def random_lengths(
    rng: np.random.Generator, mean_len: int, range_ratio: float, n: int
) -> list[int]:
    """`n` lengths, uniform integers in [floor(mean * (1 - r)), ceil(mean * (1 + r))], >= 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if mean_len < 1:
        raise ValueError(f"lengths must be at least 1, got {mean_len}")
    low = max(1, math.floor(mean_len * (1 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def allowed_token_ids(tokenizer: Any | None, vocab_size: int) -> np.ndarray:
    """Ids a random prompt may use: the tokenizer's vocabulary less its special tokens, or
    [0, vocab_size) without a tokenizer."""
    if tokenizer is None:
        return np.arange(vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    size = len(tokenizer)
    return np.array([i for i in range(size) if i not in special])


def text_of_length(
    tokenizer: Any, ids: list[int], target: int, rng: np.random.Generator, allowed: np.ndarray
) -> tuple[str, int]:
    """Decode `ids` and nudge the text until it re-encodes to `target` tokens (or give up after
    a few rounds); returns (text, its token count)."""
    text, length = "", 0
    for _ in range(_MAX_ADJUST_ROUNDS):
        text = tokenizer.decode(ids)
        encoded = list(tokenizer.encode(text, add_special_tokens=False))
        length = len(encoded)
        if length == target:
            break
        if length > target:
            ids = encoded[:target]
        else:
            ids = encoded + rng.choice(allowed, size=target - length).tolist()
    return text, length


def sample_random_requests(
    rng: np.random.Generator,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    tokenizer: Any | None = None,
    vocab_size: int = 32000,
) -> list[SampleRequest]:
    """`num_prompts` random requests; text prompts with a tokenizer, token ids without."""
    input_lens = random_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = random_lengths(rng, output_len, range_ratio, num_prompts)
    allowed = allowed_token_ids(tokenizer, vocab_size)
    requests = []
    for in_len, out_len in zip(input_lens, output_lens, strict=True):
        ids = rng.choice(allowed, size=in_len).tolist()
        if tokenizer is None:
            requests.append(SampleRequest(ids, in_len, out_len))
        else:
            text, length = text_of_length(tokenizer, ids, in_len, rng, allowed)
            requests.append(SampleRequest(text, length, out_len))
    return requests
