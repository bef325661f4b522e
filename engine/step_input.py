"""Batch builder: a `SchedulerOutput` flattened into one ragged token batch, padded to buckets,
packed into a single int32 buffer so each step costs one host->device transfer.

Layout of the buffer (all int32; float fields are bit-cast), for buckets T tokens, R requests
and P pages per request — `StepLayout` computes the offsets, `unpack` reads them inside the jit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from engine.types import SchedulerOutput

# name -> (length in units of T, R, R+1, 1 or R*P; is_float)
_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("token_ids", "T", False),  # [T] ids to compute
    ("positions", "T", False),  # [T] position of each token in its request
    ("slot_ids", "T", False),  # [T] cache slot its K/V is written to (padding: page 0)
    ("token_rows", "T", False),  # [T] persistent row of the token's request (padding: scratch)
    ("is_output", "T", False),  # [T] 1 if the token is an output token (penalty counts)
    ("is_prompt", "T", False),  # [T] 1 if the token is a prompt token (repetition penalty)
    ("next_token_ids", "T", False),  # [T] prompt token p+1 (prompt logprobs), else 0
    ("logprobs_flags", "R", False),  # [R] bit 0: logprobs wanted, bit 1: prompt logprobs
    ("kv_lens", "R", False),  # [R] context length including this step's tokens
    ("logits_index", "R", False),  # [R] index of the request's last token in the batch
    ("rows", "R", False),  # [R] persistent row (padding: scratch)
    ("reset_rows", "R", False),  # [R] 1 when the request starts from position 0
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
    ("query_start", "R+1", False),  # [R + 1]
    ("num_seqs", "1", False),  # [1]
    ("page_table", "RP", False),  # [R, P]
)


@dataclasses.dataclass(frozen=True)
class StepLayout:
    num_tokens: int  # T bucket
    num_requests: int  # R bucket
    pages_per_request: int  # P

    def sizes(self) -> dict[str, int]:
        t, r, p = self.num_tokens, self.num_requests, self.pages_per_request
        units = {"T": t, "R": r, "R+1": r + 1, "1": 1, "RP": r * p}
        return {name: units[unit] for name, unit, _ in _FIELDS}

    @property
    def size(self) -> int:
        return sum(self.sizes().values())


def unpack(buffer: jax.Array, layout: StepLayout) -> dict[str, jax.Array]:
    """Inside the jit: the int32 buffer -> named arrays (floats bit-cast back)."""
    out, offset = {}, 0
    sizes = layout.sizes()
    for name, _, is_float in _FIELDS:
        x = buffer[offset : offset + sizes[name]]
        offset += sizes[name]
        out[name] = jax.lax.bitcast_convert_type(x, jnp.float32) if is_float else x
    out["page_table"] = out["page_table"].reshape(layout.num_requests, layout.pages_per_request)
    out["seeds"] = jax.lax.bitcast_convert_type(out["seeds"], jnp.uint32)
    return out


def pick_bucket(ladder: tuple[int, ...], n: int) -> int:
    for size in ladder:
        if size >= n:
            return size
    raise AssertionError(f"{n} exceeds the largest bucket {ladder[-1]}")


def build_step_input(
    sched: SchedulerOutput,
    layout: StepLayout,
    *,
    page_size: int,
    rows: list[int],
    seeds: list[int],
    scratch_row: int,
) -> np.ndarray:
    """Fill the packed int32 buffer for this step. `rows`/`seeds` are per scheduled request."""
    t, r, p = layout.num_tokens, layout.num_requests, layout.pages_per_request
    f = {name: np.zeros(n, np.int32) for name, n in layout.sizes().items()}
    floats = {name: np.zeros(layout.sizes()[name], np.float32) for name, _, fl in _FIELDS if fl}
    f["token_rows"][:] = scratch_row
    f["rows"][:] = scratch_row
    floats["top_p"][:] = 1.0
    floats["repetition_penalty"][:] = 1.0
    page_table = f["page_table"].reshape(r, p)
    start = 0
    for i, req in enumerate(sched.requests):
        n = req.num_tokens
        end = start + n
        pos = np.arange(req.start_position, req.start_position + n)
        pages = np.asarray(req.page_ids, np.int32)
        f["token_ids"][start:end] = req.token_ids
        f["positions"][start:end] = pos
        f["slot_ids"][start:end] = pages[pos // page_size] * page_size + pos % page_size
        f["token_rows"][start:end] = rows[i]
        is_prompt = pos < req.num_prompt_tokens
        f["is_prompt"][start:end] = is_prompt
        f["is_output"][start:end] = ~is_prompt
        # Prompt logprobs: position p scores prompt token p + 1 when that token is in the chunk
        # (the chunk's last one is scored by `next_prompt_token_id`, from the next chunk).
        tokens = np.asarray(req.token_ids, np.int32)
        nxt = np.append(tokens[1:], max(req.next_prompt_token_id, 0))
        f["next_token_ids"][start:end] = np.where(pos + 1 < req.num_prompt_tokens, nxt, 0)
        f["kv_lens"][i] = req.start_position + n
        f["logits_index"][i] = end - 1
        f["rows"][i] = rows[i]
        f["reset_rows"][i] = req.start_position == 0
        f["output_lens"][i] = req.start_position + n - req.num_prompt_tokens
        f["query_start"][i + 1] = end
        page_table[i, : len(pages)] = pages
        sp = req.sampling_params
        f["min_tokens"][i] = sp.min_tokens
        f["logprobs_flags"][i] = (sp.logprobs is not None) | (sp.prompt_logprobs is not None) << 1
        f["seeds"][i] = np.uint32(seeds[i]).view(np.int32)
        f["top_k"][i] = sp.top_k if sp.top_k and sp.top_k > 0 else 0
        floats["temperature"][i] = sp.temperature if sp.temperature > 1e-5 else 0.0
        floats["top_p"][i] = sp.top_p
        floats["min_p"][i] = sp.min_p
        floats["presence_penalty"][i] = sp.presence_penalty
        floats["frequency_penalty"][i] = sp.frequency_penalty
        floats["repetition_penalty"][i] = sp.repetition_penalty
        start = end
    assert start <= t, f"{start} tokens exceed the bucket {t}"
    f["query_start"][len(sched.requests) + 1 :] = start
    f["num_seqs"][0] = len(sched.requests)
    for name, arr in floats.items():
        f[name] = arr.view(np.int32)
    return np.concatenate([f[name] for name, _, _ in _FIELDS])
