"""A pure-Python stand-in for the model runner, for scheduler tests.

It keeps a fake KV cache (one token id per slot), writes each step's tokens into the slots the
scheduler's page ids give, and "samples" the next token as a fixed function of the whole context
read back from those slots. So a request's outputs equal `reference_generate` exactly when the
scheduler and allocator hand out the right pages (prefix hits, preemption, chunking included).
"""

from __future__ import annotations

import random

from engine.page_allocator import PAD_PAGE_ID
from engine.sampling_params import SamplingParams
from engine.types import SchedulerOutput, StepOutput

VOCAB_SIZE = 40
EOS_TOKEN_ID = 1


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of every token of the context."""
    acc = len(context)
    for token_id in context:
        acc = (acc * 1000003 + token_id) % 2_147_483_647
    return acc % VOCAB_SIZE


def reference_generate(
    prompt: list[int], params: SamplingParams, max_model_len: int, eos: int | None = EOS_TOKEN_ID
) -> tuple[list[int], str]:
    """What the engine must produce for a prompt: (output ids, finish reason), no engine used."""
    tokens, out = list(prompt), []
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len
    while True:
        token_id = next_token(tokens)
        tokens.append(token_id)
        out.append(token_id)
        if len(tokens) >= min(len(prompt) + max_tokens, max_model_len):
            return out, "length"
        if len(out) < params.min_tokens:
            continue
        if (not params.ignore_eos and token_id == eos) or token_id in params.stop_token_ids:
            return out, "stop"


class FakeRunner:
    """Executes a SchedulerOutput against a fake KV cache of [num_pages, page_size] token ids."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.kv = [[-1] * page_size for _ in range(num_pages)]
        self.known: set[str] = set()  # requests it holds state for (checks the drop contract)
        self.last_sampled: dict[str, int] = {}  # what a -1 placeholder token stands for

    def execute(self, scheduler_output: SchedulerOutput) -> StepOutput:
        size = self.page_size
        self.known -= scheduler_output.finished_request_ids
        self.known -= scheduler_output.preempted_request_ids
        sampled = []
        for req in scheduler_output.requests:
            end = req.start_position + req.num_tokens
            assert req.num_tokens >= 1, "scheduled with no tokens"
            assert len(req.page_ids) * size >= end, "pages do not cover the tokens"
            assert PAD_PAGE_ID not in req.page_ids, "the padding page was scheduled"
            for i, token_id in enumerate(req.token_ids):
                if token_id == -1:  # sampled by a step not yet applied (async scheduling)
                    token_id = self.last_sampled[req.request_id]
                pos = req.start_position + i
                self.kv[req.page_ids[pos // size]][pos % size] = token_id
            self.known.add(req.request_id)
            if req.sample:
                context = [self.kv[req.page_ids[p // size]][p % size] for p in range(end)]
                sampled.append(next_token(context))
                self.last_sampled[req.request_id] = sampled[-1]
            else:
                sampled.append(-1)
        return StepOutput(sampled_token_ids=sampled)


def random_prompt(rng: random.Random, prefixes: list[list[int]], max_len: int) -> list[int]:
    """A prompt that often starts with one of `prefixes`, so prefix caching has hits."""
    prompt = list(rng.choice(prefixes)) if prefixes and rng.random() < 0.7 else []
    prompt += [rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randint(1, 12))]
    return prompt[:max_len]
