"""Batch builder: a `SchedulerOutput` flattened into one ragged token batch, padded to buckets,
packed into a single int32 buffer so each step costs one host->device transfer.

Layout of the buffer (all int32; float fields are bit-cast), for buckets T tokens, R requests
and P pages per request — `StepLayout` computes the offsets, `unpack` reads them inside the jit.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from engine.types import SchedulerOutput

# Two packed buffers per step, sent in one transfer: what the forward pass reads (units of T,
# R, R+1, 1 or R*P) and what the sampler reads (units of R only, so samplers compile per R bucket).
# Each field: (name, unit, is_float).
MODEL_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("token_ids", "T", False),  # [T] ids to compute
    ("positions", "T", False),  # [T] position of each token in its request
    ("slot_ids", "T", False),  # [T] cache slot its K/V is written to (padding: page 0)
    ("token_rows", "T", False),  # [T] persistent row of the token's request (padding: scratch)
    ("is_output", "T", False),  # [T] 1 if the token is an output token (penalty counts)
    ("is_prompt", "T", False),  # [T] 1 if the token is a prompt token (repetition penalty)
    ("kv_lens", "R", False),  # [R] context length including this step's tokens
    ("logits_index", "R", False),  # [R] index of the request's last token in the batch
    ("rows", "R", False),  # [R] persistent row (padding: scratch)
    ("reset_rows", "R", False),  # [R] 1 when the request starts from position 0
    ("query_start", "R+1", False),  # [R + 1]
    ("num_seqs", "1", False),  # [1]
    ("page_table", "RP", False),  # [R, P]
)
# `SamplingParams.sampler_values`, in this order.
SAMPLER_VALUES = (
    "min_tokens",
    "top_k",
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
SAMPLE_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("rows", "R", False),  # [R] persistent row (padding: scratch)
    ("output_lens", "R", False),  # [R] output tokens before this step's sample
    ("min_tokens", "R", False),  # [R]
    ("seeds", "R", False),  # [R] uint32 bits
    ("top_k", "R", False),  # [R] 0 = off
    ("temperature", "R", True),  # [R] 0 = greedy
    ("top_p", "R", True),
    ("min_p", "R", True),
    ("presence_penalty", "R", True),
    ("frequency_penalty", "R", True),
    ("repetition_penalty", "R", True),
)


@dataclasses.dataclass(frozen=True)
class StepLayout:
    num_tokens: int  # T bucket
    num_requests: int  # R bucket
    pages_per_request: int  # P
    # The GPU attention kernel its forward executable runs ("triton" / "mgpu"), where the
    # runner compiles the bucket on both (`Buckets.kernel_twins`); None otherwise.
    attention: str | None = None

    def sizes(self, fields=MODEL_FIELDS) -> dict[str, int]:
        t, r, p = self.num_tokens, self.num_requests, self.pages_per_request
        units = {"T": t, "R": r, "R+1": r + 1, "1": 1, "RP": r * p}
        return {name: units[unit] for name, unit, _ in fields}

    @property
    def size(self) -> int:
        return sum(self.sizes().values())

    @property
    def sample_size(self) -> int:
        return sum(self.sizes(SAMPLE_FIELDS).values())


def unpack(buffer: jax.Array, layout: StepLayout, fields=MODEL_FIELDS) -> dict[str, jax.Array]:
    """Inside the jit: an int32 buffer -> named arrays (floats bit-cast back)."""
    out, offset = {}, 0
    sizes = layout.sizes(fields)
    for name, _, is_float in fields:
        x = buffer[offset : offset + sizes[name]]
        offset += sizes[name]
        out[name] = jax.lax.bitcast_convert_type(x, jnp.float32) if is_float else x
    if "page_table" in out:
        out["page_table"] = out["page_table"].reshape(layout.num_requests, layout.pages_per_request)
    if "seeds" in out:
        out["seeds"] = jax.lax.bitcast_convert_type(out["seeds"], jnp.uint32)
    return out


def pick_bucket(ladder: tuple[int, ...], n: int) -> int:
    for size in ladder:
        if size >= n:
            return size
    raise AssertionError(f"{n} exceeds the largest bucket {ladder[-1]}")


@dataclasses.dataclass(frozen=True)
class StepBuffers:
    model: np.ndarray  # [layout.size] int32: MODEL_FIELDS packed
    sample: np.ndarray  # [layout.sample_size] int32: SAMPLE_FIELDS packed
    next_token_ids: np.ndarray  # [T] prompt token p + 1 at position p (prompt logprobs), else 0


class BufferPool:
    """Two pairs of packed buffers per layout, handed out in turn. A fresh buffer each step
    costs page faults: 2.5 ms to zero and pack the [R, P] page table at R = 1,024, P = 512
    (max_model_len 8,192), against 0.1 ms to refill one. A pair is refilled two dispatches
    after its last use, when the step that read it has been collected (`LLMEngine.step`)."""

    def __init__(self) -> None:
        self._pairs: dict[StepLayout, list[tuple[np.ndarray, np.ndarray]]] = {}

    def get(self, layout: StepLayout) -> tuple[np.ndarray, np.ndarray]:
        pairs = self._pairs.get(layout)
        if pairs is None:
            pairs = self._pairs[layout] = [
                (np.zeros(layout.size, np.int32), np.zeros(layout.sample_size, np.int32))
                for _ in range(2)
            ]
        pairs.reverse()
        return pairs[0]


def _views(buffer: np.ndarray, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Each field's slice of a packed buffer (fields in `sizes` order)."""
    bounds = np.cumsum([0, *sizes.values()])
    return {name: buffer[bounds[i] : bounds[i + 1]] for i, name in enumerate(sizes)}


def build_step_input(
    sched: SchedulerOutput,
    layout: StepLayout,
    *,
    page_size: int,
    rows: list[int],
    seeds: list[int],
    scratch_row: int,
    buffers: tuple[np.ndarray, np.ndarray] | None = None,
) -> StepBuffers:
    """Fill this step's packed buffers. `rows`/`seeds` are per scheduled request; `buffers`
    (model, sample), e.g. from a `BufferPool`, are overwritten (default: new ones).

    Vectorised over requests and tokens (a Python loop of numpy calls per request costs ~2 ms
    per step at 64 requests, a third of a decode step): lists are gathered once, then each
    field is one numpy expression.
    """
    t, r, p = layout.num_tokens, layout.num_requests, layout.pages_per_request
    reqs = sched.requests
    n = len(reqs)
    if buffers is None:
        buffers = np.empty(layout.size, np.int32), np.empty(layout.sample_size, np.int32)
    model, sample = buffers
    model.fill(0)
    sample.fill(0)
    f = _views(model, layout.sizes())
    sample_f = _views(sample, layout.sizes(SAMPLE_FIELDS))
    f.update((name, v) for name, v in sample_f.items() if name != "rows")  # rows: in both
    # One pass over the requests for their scalars: [n, 5] of (tokens, start position, prompt
    # length, pages, next prompt token).
    per_request = np.fromiter(
        itertools.chain.from_iterable(
            (len(q.token_ids), q.start_position, q.num_prompt_tokens, len(q.page_ids),
             q.next_prompt_token_id)
            for q in reqs
        ),
        np.int64,
        5 * n,
    ).reshape(n, 5)  # fmt: skip
    lens, starts, prompt_lens, num_pages, next_prompt_ids = per_request.T
    ends = np.cumsum(lens)
    total = int(ends[-1]) if n else 0
    assert total <= t, f"{total} tokens exceed the bucket {t}"
    req_of_token = np.repeat(np.arange(n), lens)
    offsets = np.arange(total) - np.repeat(ends - lens, lens)
    pos = np.repeat(starts, lens) + offsets

    page_table = f["page_table"].reshape(r, p)
    total_pages = int(num_pages.sum())
    page_rows = np.repeat(np.arange(n), num_pages)
    page_cols = np.arange(total_pages) - np.repeat(np.cumsum(num_pages) - num_pages, num_pages)
    page_table[page_rows, page_cols] = np.fromiter(
        itertools.chain.from_iterable(q.page_ids for q in reqs), np.int32, total_pages
    )

    tokens = np.fromiter(itertools.chain.from_iterable(q.token_ids for q in reqs), np.int32, total)
    f["token_ids"][:total] = tokens
    f["positions"][:total] = pos
    f["slot_ids"][:total] = page_table[req_of_token, pos // page_size] * page_size + pos % page_size
    row_arr = np.asarray(rows, np.int32)
    f["token_rows"][:] = scratch_row
    f["token_rows"][:total] = row_arr[req_of_token]
    is_prompt = pos < prompt_lens[req_of_token]
    f["is_prompt"][:total] = is_prompt
    f["is_output"][:total] = ~is_prompt
    f["kv_lens"][:n] = starts + lens
    f["logits_index"][:n] = ends - 1
    for rows_field in (f["rows"], sample_f["rows"]):
        rows_field[:] = scratch_row
        rows_field[:n] = row_arr
    f["reset_rows"][:n] = starts == 0
    f["output_lens"][:n] = starts + lens - prompt_lens
    f["query_start"][1 : n + 1] = ends
    f["query_start"][n + 1 :] = total
    f["num_seqs"][0] = n

    # Prompt logprobs: position p scores prompt token p + 1: the next token in the chunk, or for
    # the chunk's last position `next_prompt_token_id`, from the next chunk.
    next_ids = np.zeros(t, np.int32)
    if total:
        nxt = np.append(tokens[1:], 0)
        nxt[ends - 1] = np.maximum(next_prompt_ids, 0)
        next_ids[:total] = np.where(pos + 1 < prompt_lens[req_of_token], nxt, 0)

    # [n, 8] in SAMPLER_VALUES order, each request's row cached on its SamplingParams.
    values = np.fromiter(
        itertools.chain.from_iterable(q.sampling_params.sampler_values for q in reqs),
        np.float64,
        len(SAMPLER_VALUES) * n,
    ).reshape(n, len(SAMPLER_VALUES))
    f["seeds"][:n] = np.asarray(seeds, np.uint32).view(np.int32)
    pad = {"top_p": 1.0, "repetition_penalty": 1.0}  # padding rows: greedy, no penalties
    for j, name in enumerate(SAMPLER_VALUES):
        if name in ("min_tokens", "top_k"):
            f[name][:n] = values[:, j]
            continue
        as_float = f[name].view(np.float32)  # bit-cast back inside the jit (`unpack`)
        as_float[:] = pad.get(name, 0.0)
        as_float[:n] = values[:, j]
    return StepBuffers(model=model, sample=sample, next_token_ids=next_ids)
