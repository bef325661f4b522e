"""The functions a step runs on the device, each compiled ahead of time per bucket by the
runner: the forward pass of a ragged batch, the sampler (in host-chosen variants), and prompt
logprobs. No device-side conditionals: an XLA:GPU `lax.cond` copies its predicate to the host
and waits, stalling every later kernel launch until the forward pass is done.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from engine.row_state import RowState, update_rows
from engine.sampler import (
    ALL_FEATURES,
    GREEDY_ONLY,
    SamplerFeatures,
    SamplingTensors,
    compute_logprobs,
    request_keys,
    sample,
)
from engine.sampling_params import MAX_LOGPROBS, SAMPLING_EPS
from engine.step_input import SAMPLE_FIELDS, StepLayout, unpack
from pallas_kernels.attention import AttentionMetadata


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    """A step's sampled tokens (and logprobs); they stay on the device until the host asks."""

    sampled_ids: jax.Array  # [R] int32
    logprobs: jax.Array  # [R] float32, of the sampled token (raw logits)
    ranks: jax.Array  # [R] int32
    top_ids: jax.Array  # [R, K] int32
    top_logprobs: jax.Array  # [R, K] float32


@dataclasses.dataclass(frozen=True)
class SampleVariant:
    """A compiled sampler: which `SamplerFeatures`, and whether logit bias, min_tokens and
    logprobs are in (`extras`). Chosen per step on the host, so the device never branches."""

    features: SamplerFeatures
    extras: bool


GREEDY = SampleVariant(GREEDY_ONLY, extras=False)
SAMPLE = SampleVariant(SamplerFeatures(random=True, sort=False, penalties=False), extras=False)
FULL = SampleVariant(ALL_FEATURES, extras=True)


def pick_variant(params: list) -> SampleVariant:
    """The cheapest sampler correct for every request of the batch."""
    for sp in params:
        if (
            sp.logprobs is not None
            or sp.logit_bias
            or sp.min_tokens > 0
            or sp.top_k > 0
            or sp.top_p < 1
            or sp.presence_penalty
            or sp.frequency_penalty
            or sp.repetition_penalty != 1
        ):
            return FULL
    return GREEDY if all(sp.temperature < SAMPLING_EPS for sp in params) else SAMPLE


def _logprob_stats(logits: jax.Array, token_ids: jax.Array, k: int):
    out = compute_logprobs(logits, token_ids, k)
    return out.sampled_logprobs, out.sampled_ranks, out.top_ids, out.top_logprobs


def _merge(model_def, params):
    graphdef, treedef = model_def
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, params))


def forward_fn(model_def, params, kv_caches, rows_state: RowState, buffer, *, layout: StepLayout):
    """The forward pass of a ragged batch: (kv_caches, rows_state, logits [R, V], hidden [T, D]).

    model_def: (graphdef, treedef) (static); params: the flat list of weight arrays. A flat
    list, not the NNX State, because flattening NNX's pytree nodes in Python on every call
    costs more host time than the dispatch itself.
    """
    x = unpack(buffer, layout)
    # -1 marks a token sampled by the previous step, still on the device: read it there.
    x["token_ids"] = jnp.where(
        x["token_ids"] < 0, rows_state.last_ids[x["token_rows"]], x["token_ids"]
    )
    model = _merge(model_def, params)
    meta = AttentionMetadata(
        x["slot_ids"],
        x["page_table"],
        x["kv_lens"],
        x["query_start"],
        x["num_seqs"],
        gpu_kernel=layout.attention,
    )
    hidden, kv_caches = model(x["token_ids"], x["positions"], kv_caches, meta)
    rows_state = update_rows(rows_state, x)
    return kv_caches, rows_state, model.logits(hidden[x["logits_index"]]), hidden


def sample_fn(
    rows_state: RowState, logits, buffer, *, layout: StepLayout, variant: SampleVariant
) -> tuple[RowState, SampleResult]:
    """One token per request from logits [R, V]; logprobs only in the `extras` variant.
    Each row's sampled id is kept on the device (`last_ids`) for the next step's input."""
    x = unpack(buffer, layout, SAMPLE_FIELDS)
    rows, r = x["rows"], layout.num_requests
    raw = logits
    if variant.extras:
        logits = logits + rows_state.logit_bias[rows]
        banned = rows_state.stop_mask[rows] & (x["output_lens"] < x["min_tokens"])[:, None]
        logits = jnp.where(banned, -jnp.inf, logits)
    penalties = variant.features.penalties
    v = logits.shape[1]
    tensors = SamplingTensors(
        temperature=x["temperature"],
        top_k=x["top_k"],
        top_p=x["top_p"],
        min_p=x["min_p"],
        presence_penalty=x["presence_penalty"],
        frequency_penalty=x["frequency_penalty"],
        repetition_penalty=x["repetition_penalty"],
        logit_bias_ids=jnp.full((r, 1), -1, jnp.int32),
        logit_bias_values=jnp.zeros((r, 1)),
        banned_ids=jnp.full((r, 1), -1, jnp.int32),
        output_token_counts=rows_state.output_counts[rows]
        if penalties
        else jnp.zeros((r, v), jnp.int32),
        prompt_token_mask=rows_state.prompt_mask[rows] if penalties else jnp.zeros((r, v), bool),
        keys=request_keys(x["seeds"], x["output_lens"]),
    )
    ids = sample(logits, tensors, features=variant.features).sampled_ids
    rows_state = dataclasses.replace(rows_state, last_ids=rows_state.last_ids.at[rows].set(ids))
    k = MAX_LOGPROBS
    if variant.extras:
        return rows_state, SampleResult(ids, *_logprob_stats(raw, ids, k))
    return rows_state, SampleResult(
        ids, jnp.zeros(r), jnp.zeros(r, jnp.int32), jnp.zeros((r, k), jnp.int32), jnp.zeros((r, k))
    )


PROMPT_LOGPROBS_CHUNK = 512


def prompt_logprobs_fn(model_def, params, hidden, next_ids, chunk: int = PROMPT_LOGPROBS_CHUNK):
    """Logprob stats of prompt token p + 1 at every position p: hidden [T, D], next_ids [T].
    Rare (only requests asking for prompt_logprobs), so run as its own call, `chunk` positions
    at a time: whole, an 8k-token step's f32 logits over a 128k vocabulary would take 4 GiB."""
    model = _merge(model_def, params)
    t = hidden.shape[0]
    c = min(t, chunk)
    n = -(-t // c)
    hidden = jnp.pad(hidden, ((0, n * c - t), (0, 0))).reshape(n, c, -1)
    next_ids = jnp.pad(next_ids, (0, n * c - t)).reshape(n, c)
    stats = jax.lax.map(
        lambda x: _logprob_stats(model.logits(x[0]), x[1], MAX_LOGPROBS), (hidden, next_ids)
    )
    return tuple(s.reshape(n * c, *s.shape[2:])[:t] for s in stats)
