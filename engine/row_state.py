"""Per-request state kept on the device between steps, one row per running request.

Penalties need each request's output-token counts and prompt-token set over the vocabulary;
logit_bias and min_tokens need a bias row and a stop-token mask. Sending these [R, V] arrays every
step would cost more than the step, so they live on the device and are updated inside the step
from the tokens being computed: a token at a prompt position sets the prompt mask, any other
token counts as output. A request restarted after preemption gets a fresh row, rebuilt the same
way by its recompute.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowState:
    output_counts: jax.Array  # [rows, V] int32: occurrences of each id among output tokens
    prompt_mask: jax.Array  # [rows, V] bool: id occurs in the prompt
    logit_bias: jax.Array  # [rows, V] float32: the request's logit_bias, dense
    stop_mask: jax.Array  # [rows, V] bool: EOS/stop ids, banned while output_len < min_tokens
    last_ids: jax.Array  # [rows] int32: the token each row sampled last (async scheduling)

    @classmethod
    def zeros(cls, num_rows: int, vocab_size: int) -> RowState:
        shape = (num_rows, vocab_size)
        return cls(
            jnp.zeros(shape, jnp.int32),
            jnp.zeros(shape, bool),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape, bool),
            jnp.zeros(num_rows, jnp.int32),
        )


def update_rows(state: RowState, x: dict[str, jax.Array]) -> RowState:
    """Inside the forward step: add this step's tokens to their rows (prompt positions -> prompt
    mask, the rest -> output counts). No row is cleared here: `set_row_fn` clears a row when a
    request that reads it (penalties, bias, min_tokens) is admitted, and rows of requests that
    don't read them may hold stale counts, which zero penalties ignore."""
    token_rows, token_ids = x["token_rows"], x["token_ids"]
    return dataclasses.replace(
        state,
        output_counts=state.output_counts.at[token_rows, token_ids].add(x["is_output"]),
        prompt_mask=state.prompt_mask.at[token_rows, token_ids].max(x["is_prompt"] != 0),
    )


def set_row_fn(
    rows_state: RowState,
    row: jax.Array,
    bias_ids: jax.Array,
    bias_values: jax.Array,
    stop_ids: jax.Array,
) -> RowState:
    """Start a row afresh: zero its counts and prompt mask, write its logit bias and stop mask
    (ids padded with -1). Called before the request's first step, whose prompt tokens the
    forward pass then adds."""
    vocab = rows_state.logit_bias.shape[1]
    valid = bias_ids >= 0
    bias = (
        jnp.zeros(vocab, jnp.float32)
        .at[jnp.where(valid, bias_ids, vocab)]
        .add(jnp.where(valid, bias_values, 0.0), mode="drop")
    )
    stop = (
        jnp.zeros(vocab, bool).at[jnp.where(stop_ids >= 0, stop_ids, vocab)].set(True, mode="drop")
    )
    return dataclasses.replace(
        rows_state,
        output_counts=rows_state.output_counts.at[row].set(0),
        prompt_mask=rows_state.prompt_mask.at[row].set(False),
        logit_bias=rows_state.logit_bias.at[row].set(bias),
        stop_mask=rows_state.stop_mask.at[row].set(stop),
    )
