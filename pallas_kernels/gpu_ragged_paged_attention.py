"""Ragged paged attention for NVIDIA GPUs: Pallas with the Triton lowering.

Grid: (query block, kv head, kv split). A program takes `block_q` tokens of one request times
the `G = N / K` query heads of one KV head, i.e. a `[block_q * Gp, H]` tile of queries (Gp: G
rounded up to a power of two, since Triton tiles must be powers of two), so each KV page is
read once for the whole head group. It walks the request's pages `block_kv` keys at a time,
gathering page ids from the page table, with an online softmax in fp32.

Decode (q_len = 1) uses the same kernel with `block_q * Gp = 16` rows (Triton's smallest MMA
tile; the extra rows are masked loads that touch no memory) and split-K: with few requests,
`num_splits` programs share one request's pages, each writing a partial (out, max, sum), and a
jnp epilogue merges them (XLA fuses it into one small kernel).

Masked loads and stores (`pallas.triton.load/store`) keep a block inside its request: tiles
may hang past the end of q/out, and those lanes are never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import ragged_blocks as rb

_LOG2E = math.log2(math.e)
_MASK = -1e30  # finite: a fully masked row must not turn exp(m_prev - m_new) into NaN


@dataclasses.dataclass(frozen=True)
class GpuBlockConfig:
    """Tile sizes and launch parameters (static)."""

    block_q: int  # tokens per program; block_q * Gp rows of queries
    block_kv: int  # keys per inner-loop step (a multiple of the page size)
    num_splits: int = 1  # split-K programs per query block
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def default_config(
    num_tokens: int, num_requests: int, num_heads: int, num_kv_heads: int, page_size: int
) -> GpuBlockConfig:
    """Heuristic tiles: decode-like batches (T <= 2R) get 16-row tiles and split-K.

    Split-K aims at ~4 programs per SM of an H100 (132 SMs): a batch of 1 splits 16 ways,
    a batch of >= 64 not at all.
    """
    group = _next_pow2(num_heads // num_kv_heads)
    if num_tokens <= 2 * num_requests:
        splits = max(1, min(16, 528 // max(1, num_requests * num_kv_heads)))
        return GpuBlockConfig(
            block_q=max(1, 16 // group),
            block_kv=max(128, page_size),
            num_splits=_next_pow2(splits + 1) // 2,
            num_warps=4,
            num_stages=3,
        )
    return GpuBlockConfig(block_q=max(1, 64 // group), block_kv=max(64, page_size))


def _kernel(
    blocks_ref,  # [NB, NUM_FIELDS] int32
    page_table_ref,  # [R, P] int32
    q_ref,  # [T, N, H]
    kv_ref,  # [2, K, num_pages, S, H]
    *out_refs,  # o [splits?, T, N, H] (+ m, l [splits, T, N] fp32 when split)
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    cfg: GpuBlockConfig,
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_pages_per_req = page_table_ref.shape[1]
    page_size, head_dim = kv_ref.shape[3], kv_ref.shape[4]
    gp = _next_pow2(group)
    bq, bkv = cfg.block_q, cfg.block_kv
    pages_per_blk = bkv // page_size
    rows = bq * gp

    req = blocks_ref[b, rb.REQ]
    tok_start = blocks_ref[b, rb.TOK_START]
    tok_end = blocks_ref[b, rb.TOK_END]
    pos_start = blocks_ref[b, rb.POS_START]
    blk_lo = blocks_ref[b, rb.KV_BLK_LO]
    blk_hi = blocks_ref[b, rb.KV_BLK_HI]
    # This split's share of the KV blocks.
    per_split = jax.lax.div(blk_hi - blk_lo + cfg.num_splits - 1, cfg.num_splits)
    lo = blk_lo + split * per_split
    hi = jnp.minimum(lo + per_split, blk_hi)

    tok_valid = tok_start + jnp.arange(bq) < tok_end  # [bq]
    head_valid = jnp.arange(gp) < group  # [gp]
    mask2 = tok_valid[:, None] & head_valid[None, :]  # [bq, gp]
    tile_mask = jnp.broadcast_to(mask2[:, :, None], (bq, gp, head_dim))
    q_idx = (pl.ds(tok_start, bq), pl.ds(h * group, gp), slice(None))
    q = plgpu.load(q_ref.at[q_idx], mask=tile_mask, other=0)
    q = q.reshape(rows, head_dim)
    # Position of each query row (token-major, head-minor), without integer division.
    row_pos = jnp.broadcast_to((pos_start + jnp.arange(bq))[:, None], (bq, gp)).reshape(rows)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(j, carry):
        acc, m_prev, l_prev = carry
        page_idx = j * pages_per_blk + jnp.arange(pages_per_blk)
        pages = plgpu.load(
            page_table_ref.at[req, pl.ds(j * pages_per_blk, pages_per_blk)],
            mask=page_idx < num_pages_per_req,
            other=0,
        )
        k = kv_ref[0, h, pages].reshape(bkv, head_dim)
        v = kv_ref[1, h, pages].reshape(bkv, head_dim)
        s = (
            jax.lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            * sm_scale
        )  # [rows, bkv]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = s * _LOG2E  # softmax in base 2: exp2 is the native instruction
        key_pos = j * bkv + jnp.arange(bkv)
        mask = key_pos[None, :] <= row_pos[:, None]
        if sliding_window is not None:
            mask &= key_pos[None, :] > row_pos[:, None] - sliding_window
        s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        pv = jax.lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return acc * alpha[:, None] + pv, m_new, l_prev * alpha + p.sum(axis=1)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), _MASK, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l_sum = jax.lax.fori_loop(lo, hi, body, init)
    if cfg.num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l_sum == 0.0, 1.0, l_sum)[:, None]  # l == 0: padding rows, write 0
        plgpu.store(
            o_ref.at[q_idx], out.reshape(bq, gp, head_dim).astype(o_ref.dtype), mask=tile_mask
        )
    else:
        o_ref, m_ref, l_ref = out_refs
        idx = (split, *q_idx)
        plgpu.store(o_ref.at[idx], acc.reshape(bq, gp, head_dim), mask=tile_mask)
        plgpu.store(m_ref.at[idx[:3]], m.reshape(bq, gp), mask=mask2)
        plgpu.store(l_ref.at[idx[:3]], l_sum.reshape(bq, gp), mask=mask2)


def _merge_splits(o: jax.Array, m: jax.Array, l_sum: jax.Array, dtype) -> jax.Array:
    """o: [splits, T, N, H], m, l_sum: [splits, T, N] (base-2 max). Returns [T, N, H] in dtype."""
    m_all = m.max(axis=0)
    w = jnp.exp2(m - m_all[None])  # [splits, T, N]
    l_all = (w * l_sum).sum(axis=0)
    out = (w[..., None] * o).sum(axis=0) / jnp.where(l_all == 0.0, 1.0, l_all)[..., None]
    return out.astype(dtype)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "config", "interpret"),
)
def ragged_paged_attention(
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
    config: GpuBlockConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as `ragged_paged_attention_reference` (see reference.py).

    q: [T, N, H]; kv_cache: [2, K, num_pages, S, H]; kv_lens: [R]; page_table: [R, P];
    query_start: [R + 1]; num_seqs: [1]. Returns [T, N, H] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_cache.shape
    num_requests = kv_lens.shape[0]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert head_dim & (head_dim - 1) == 0, "Triton tiles need a power-of-two head_dim"
    cfg = config or default_config(num_tokens, num_requests, num_heads, num_kv_heads, page_size)
    assert cfg.block_kv % page_size == 0, f"{cfg.block_kv=} must be a multiple of {page_size=}"
    group = num_heads // num_kv_heads
    blocks = rb.query_blocks(
        query_start,
        kv_lens,
        num_seqs,
        num_tokens=num_tokens,
        block_q=cfg.block_q,
        block_kv=cfg.block_kv,
        sliding_window=sliding_window,
    )
    grid = (blocks.shape[0], num_kv_heads, cfg.num_splits)
    if cfg.num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        s = cfg.num_splits
        out_shape = [
            jax.ShapeDtypeStruct((s, *q.shape), jnp.float32),
            jax.ShapeDtypeStruct((s, num_tokens, num_heads), jnp.float32),
            jax.ShapeDtypeStruct((s, num_tokens, num_heads), jnp.float32),
        ]
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        group=group,
        cfg=cfg,
    )
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(blocks, page_table.astype(jnp.int32), q, kv_cache)
    if cfg.num_splits == 1:
        return outs[0]
    return _merge_splits(*outs, q.dtype)
