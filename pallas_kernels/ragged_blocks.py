"""Query-block metadata shared by the GPU and TPU ragged paged attention kernels.

A kernel program handles one *query block*: up to `block_q` consecutive tokens of one request
(times the query heads of one KV head). Blocks never straddle requests, so each request costs
`cdiv(q_len, block_q)` blocks and the batch at most `cdiv(T, block_q) + R + 1` (the static grid
size); surplus blocks are empty. The padding tokens `query_start[num_seqs]:T` form one more
pseudo-request with an empty KV range, so the kernels write their output as zeros themselves.

All of this is computed with jnp outside the kernels: cheap, and it keeps the kernels free of
searches over `query_start`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Columns of the [NB, NUM_FIELDS] int32 block table.
REQ, TOK_START, TOK_END, POS_START, KV_BLK_LO, KV_BLK_HI = range(6)
NUM_FIELDS = 6


def num_query_blocks(num_tokens: int, num_requests: int, block_q: int) -> int:
    """Static upper bound on the number of query blocks (grid size)."""
    return -(-num_tokens // block_q) + num_requests + 1


def request_extents(
    query_start: jax.Array,
    kv_lens: jax.Array,
    num_seqs: jax.Array,
    num_tokens: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per (request + padding pseudo-request): first token, q_len, kv_len. Each [R + 1]."""
    num_requests = kv_lens.shape[0]
    num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    real = jnp.arange(num_requests) < num_seqs
    q_lens = jnp.where(real, query_start[1:] - query_start[:-1], 0)
    pad_start = query_start[num_seqs]
    starts = jnp.concatenate([query_start[:-1], pad_start[None]]).astype(jnp.int32)
    lens = jnp.concatenate([q_lens, (num_tokens - pad_start)[None]]).astype(jnp.int32)
    kv = jnp.concatenate([jnp.where(real, kv_lens, 0), jnp.zeros((1,), kv_lens.dtype)])
    return starts, lens, kv.astype(jnp.int32)


def assign_blocks(per_request: jax.Array, num_blocks: int) -> tuple[jax.Array, ...]:
    """Hand out `num_blocks` blocks in request order, `per_request[r]` to each entry of
    `request_extents` (the padding pseudo-request last). Returns, per block: its owner (R + 1:
    a surplus block), the owner clamped to R (safe to index with), and the block's index
    among its owner's. [NB] int32 each."""
    ends = jnp.cumsum(per_request)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # Unrolled binary search: the default method ("scan") is a while loop, a few small kernel
    # launches per step on a GPU (H200: 32 -> 5 kernels for a batch-32 decode call).
    owner = jnp.searchsorted(ends, b, side="right", method="scan_unrolled").astype(jnp.int32)
    o = jnp.minimum(owner, per_request.shape[0] - 1)
    return owner, o, b - (ends[o] - per_request[o])


def query_blocks(
    query_start: jax.Array,
    kv_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    num_tokens: int,
    block_q: int,
    block_kv: int,
    sliding_window: int | None,
) -> jax.Array:
    """Block table: [NB, NUM_FIELDS] int32, NB = num_query_blocks(T, R, block_q).

    Per block: REQ (page-table row, 0 for padding blocks), TOK_START/TOK_END (its tokens),
    POS_START (position of TOK_START in its request), KV_BLK_LO/KV_BLK_HI (the range of
    `block_kv`-key blocks its tokens can see: causal and sliding-window bounds; empty for the
    padding pseudo-request and surplus blocks).
    """
    num_requests = kv_lens.shape[0]
    nb = num_query_blocks(num_tokens, num_requests, block_q)
    starts, lens, kv = request_extents(query_start, kv_lens, num_seqs, num_tokens)
    owner, o, j = assign_blocks(-(-lens // block_q), nb)
    used = owner <= num_requests  # owner R is the padding pseudo-request, R + 1 surplus
    tok_start = jnp.where(used, starts[o] + j * block_q, 0)
    tok_end = jnp.where(used, jnp.minimum(tok_start + block_q, starts[o] + lens[o]), 0)
    pos_start = kv[o] - lens[o] + (tok_start - starts[o])
    pos_last = pos_start + (tok_end - tok_start) - 1
    lo = jnp.zeros_like(pos_start)
    if sliding_window is not None:
        lo = jnp.maximum(pos_start - sliding_window + 1, 0)
    blk_lo = lo // block_kv
    real = (owner < num_requests) & (tok_end > tok_start)
    blk_hi = jnp.where(real, pos_last // block_kv + 1, blk_lo)
    req = jnp.where(owner < num_requests, owner, 0)
    return jnp.stack([req, tok_start, tok_end, pos_start, blk_lo, blk_hi], axis=1).astype(jnp.int32)


def token_rows(
    query_start: jax.Array,
    num_seqs: jax.Array,
    *,
    num_tokens: int,
    block_q: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each token sits in the block layout (the inverse of `query_blocks`).

    Returns (block [T], token offset within its block [T], valid [T] bool); padding tokens get
    block 0 and valid False.
    """
    num_requests = query_start.shape[0] - 1
    starts, lens, _ = request_extents(
        query_start, jnp.zeros((num_requests,), jnp.int32), num_seqs, num_tokens
    )
    blocks_per_req = -(-lens // block_q)
    first_block = jnp.cumsum(blocks_per_req) - blocks_per_req
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    req = jnp.searchsorted(query_start[1:], t, side="right").astype(jnp.int32)
    valid = t < query_start[jnp.reshape(num_seqs, ())]
    req = jnp.where(valid, jnp.minimum(req, num_requests - 1), 0)
    offset = t - starts[req]
    block = jnp.where(valid, first_block[req] + offset // block_q, 0)
    return block, jnp.where(valid, offset % block_q, 0), valid
