"""Plain-jnp ragged paged attention and KV-cache write: the readable truth every kernel is
tested against, and the attention backend on the CPU.

KV cache layout (one array per layer), defined here and nowhere else:

    kv_cache: [2, K, num_pages, S, H]     index 0 = keys, 1 = values

A token's slot is `page_id * S + offset`. Page 0 is the padding page: padding tokens write there.

Ragged batch contract (shared by every backend):
  - request r owns the query tokens `query_start[r] : query_start[r + 1]` (q_len >= 1 for a real
    request, 0 for a padding request), and `kv_lens[r]` tokens of context *including* its new
    tokens, so its i-th query token sits at position `kv_lens[r] - q_len + i` and attends causally
    to positions `<= ` that one;
  - requests `>= num_seqs` are padding; tokens at or past `query_start[num_seqs]` are padding and
    their output is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The cache's axes by logical name (sharding.RULES): tensor parallelism splits its KV heads.
KV_CACHE_AXES = (None, "kv_heads", None, None, None)


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int):
    """Shape of one layer's KV cache: [2, K, num_pages, S, H]."""
    return (2, num_kv_heads, num_pages, page_size, head_dim)


def write_kv_reference(
    kv_cache: jax.Array, k: jax.Array, v: jax.Array, slot_ids: jax.Array
) -> jax.Array:
    """Store new keys and values at their slots. Slots in page 0 (where padding tokens point;
    no request is given that page) are dropped, so the page is never written.

    kv_cache: [2, K, num_pages, S, H]; k, v: [T, K, H]; slot_ids: [T] int32.
    Returns the updated cache (same shape, in place when the caller donates it).

    The remaining slots are distinct, and the scatter is told so: XLA's GPU scatter then skips
    its duplicate handling, 4.9x faster for a 2,048-token step (H100: 8.3 against 40.5 us a
    layer) and 1.9x for a 256-token decode step.
    """
    two, num_kv_heads, num_pages, page_size, head_dim = kv_cache.shape
    flat = kv_cache.reshape(two, num_kv_heads, num_pages * page_size, head_dim)
    new = jnp.stack([k, v]).transpose(0, 2, 1, 3).astype(kv_cache.dtype)  # [2, K, T, H]
    dropped = num_pages * page_size  # out of range
    slots = jnp.where(slot_ids < page_size, dropped, slot_ids)
    flat = flat.at[:, :, slots].set(new, mode="drop", unique_indices=True)
    return flat.reshape(kv_cache.shape)


def token_request_ids(query_start: jax.Array, num_tokens: int) -> jax.Array:
    """Request index of each token: [T] int32 (padding tokens get an index >= num_seqs)."""
    return jnp.searchsorted(query_start[1:], jnp.arange(num_tokens), side="right").astype(jnp.int32)


def ragged_paged_attention_reference(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    query_start: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Causal attention of a ragged batch of queries over a paged KV cache.

    q: [T, N, H]; kv_cache: [2, K, num_pages, S, H]; kv_lens: [R]; page_table: [R, P];
    query_start: [R + 1]; num_seqs: [1] or scalar. Returns [T, N, H] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_cache.shape
    num_requests, pages_per_request = page_table.shape
    group = num_heads // num_kv_heads
    num_seqs = jnp.reshape(num_seqs, ())

    token_ids = jnp.arange(num_tokens)
    req = token_request_ids(query_start, num_tokens)
    valid = token_ids < query_start[num_seqs]
    req = jnp.minimum(req, num_requests - 1)
    q_len = query_start[req + 1] - query_start[req]
    q_pos = kv_lens[req] - q_len + (token_ids - query_start[req])  # [T]

    # Gather each token's context: [K, T, P * S, H]. Simple, memory-hungry: the reference only.
    pages = page_table[req]  # [T, P]
    keys = kv_cache[0][:, pages].reshape(num_kv_heads, num_tokens, -1, head_dim)
    values = kv_cache[1][:, pages].reshape(num_kv_heads, num_tokens, -1, head_dim)
    kv_pos = jnp.arange(pages_per_request * page_size)  # [L]

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgh,ktlh->tkgl", qg, keys.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    mask = kv_pos[None, :] <= q_pos[:, None]  # [T, L]
    if sliding_window is not None:
        mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(valid[:, None, None, None], probs, 0.0)  # padding tokens: all -inf rows
    out = jnp.einsum("tkgl,ktlh->tkgh", probs, values.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
