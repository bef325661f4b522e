"""Ragged paged attention in plain jnp that scales with the context actually in the batch: the
CPU backend. The readable reference gathers every request's full page table (max_model_len keys
per token); this walks the page table in blocks, only as many as the longest request needs (a
`lax.while_loop` with a data-dependent trip count), with an online softmax, so a decode over a
short context costs a short context. Same contract as `ragged_paged_attention_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import token_request_ids


def ragged_paged_attention_blocked(
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
    pages_per_block: int = 8,
) -> jax.Array:
    """q: [T, N, H]; kv_cache: [2, K, num_pages, S, H]; kv_lens: [R]; page_table: [R, P];
    query_start: [R + 1]; num_seqs: [1]. Returns [T, N, H] (zeros for padding tokens)."""
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_cache.shape
    num_requests, num_pages = page_table.shape
    group = num_heads // num_kv_heads
    num_seqs = jnp.reshape(num_seqs, ())
    ppb = min(pages_per_block, num_pages)
    pad = -num_pages % ppb
    page_table = jnp.pad(page_table, ((0, 0), (0, pad)))
    block = ppb * page_size

    t = jnp.arange(num_tokens)
    req = jnp.minimum(token_request_ids(query_start, num_tokens), num_requests - 1)
    valid = t < query_start[num_seqs]
    q_len = query_start[req + 1] - query_start[req]
    q_pos = kv_lens[req] - q_len + (t - query_start[req])  # [T]
    lens = jnp.where(jnp.arange(num_requests) < num_seqs, kv_lens, 0)
    num_blocks = (jnp.max(lens) + block - 1) // block
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32) * sm_scale

    def body(carry):
        i, m, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(page_table, i * ppb, ppb, axis=1)[req]  # [T, ppb]
        k = kv_cache[0][:, pages].reshape(num_kv_heads, num_tokens, block, head_dim)
        v = kv_cache[1][:, pages].reshape(num_kv_heads, num_tokens, block, head_dim)
        s = jnp.einsum("tkgh,ktlh->tkgl", qg, k.astype(jnp.float32))
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = i * block + jnp.arange(block)
        mask = kv_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isinf(m_new), 0.0, m_new)  # rows with nothing seen yet
        p = jnp.exp(s - m_safe[..., None])
        scale = jnp.exp(m - m_safe)
        denom = denom * scale + p.sum(-1)
        acc = acc * scale[..., None] + jnp.einsum("tkgl,ktlh->tkgh", p, v.astype(jnp.float32))
        return i + 1, m_new, denom, acc

    shape = (num_tokens, num_kv_heads, group)
    init = (
        jnp.int32(0),
        jnp.full(shape, -jnp.inf),
        jnp.zeros(shape),
        jnp.zeros((*shape, head_dim)),
    )
    _, _, denom, acc = jax.lax.while_loop(lambda c: c[0] < num_blocks, body, init)
    out = jnp.where(
        (valid & (denom[:, 0, 0] > 0))[:, None, None, None], acc / denom[..., None], 0.0
    )
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
