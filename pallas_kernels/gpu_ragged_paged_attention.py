"""Ragged paged attention for NVIDIA GPUs: Pallas with the Triton lowering.

Grid: (query block, kv head, kv split). A program takes `block_q` tokens of one request times
the `G = N / K` query heads of one KV head, i.e. a `[block_q * Gp, H]` tile of queries (Gp: G
rounded up to a power of two, since Triton tiles must be powers of two), so each KV page is
read once for the whole head group. It walks the request's keys `block_kv` at a time with an
online softmax in fp32. The tile's rows are gathered from q viewed as `[T * N, H]`: loading a
`[block_q, Gp, H]` block and reshaping it made a prefill call 1.2x slower (H100).

KV gather: the cache is viewed as `[2, K, num_pages * S, H]` (a free reshape) and each step
loads a `[block_kv, H]` tile of K and of V by slot (`page_table[key // S] * S + key % S`), so a
step may span several pages (or part of one) and the tile feeds the dot as loaded (no reshape),
contiguous along H; Triton's software pipeline (`num_stages`) keeps the next tiles in flight.

Masking: only the KV blocks that some row of the tile cannot fully see (the causal diagonal,
and the sliding window's lower edge) run the masked loop; the others skip the mask.

Decode (q_len = 1) uses the same kernel with `block_q * Gp = 16` rows (Triton's smallest MMA
tile; the extra rows are masked loads that touch no memory). With bigger tiles, a block of at
most `16 / Gp` tokens (a decode beside prefill chunks) takes a 16-row path in the same kernel
(lax.cond), not 4-8x the MMA work on masked rows. Split-K: with few requests,
`num_splits` programs share one request's keys, each writing a partial (out, max, sum), and a
jnp epilogue merges them (one or two small XLA kernels).

Masked stores (`pallas.triton.store`) keep a block inside its request: tiles may hang past
the end of the output, and those lanes are never touched. A program whose block has no tokens
(the grid is a static bound) returns at once.
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
_MIN_ROWS = 16  # Triton's smallest MMA tile (rows)
_MASK = -1e30  # finite: a fully masked row must not turn exp(m_prev - m_new) into NaN
# Hopper allows 227 KiB of shared memory per block (232448 bytes); keep room for Triton's own
# scratch (layout conversions, barriers).
_SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class GpuBlockConfig:
    """Tile sizes and launch parameters (static)."""

    block_q: int  # tokens per program; block_q * Gp rows of queries
    block_kv: int  # keys per inner-loop step: a power of two (>= 16 on a GPU), any page size
    num_splits: int = 1  # split-K programs per query block
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def smem_bytes(cfg: GpuBlockConfig, group: int, head_dim: int, itemsize: int) -> int:
    """Upper bound on the shared memory Triton asks for: K and V tiles `max(1, num_stages - 1)`
    deep, the q tile, and from 64 rows (warpgroup MMA) the probabilities tile too. Exact for
    the two fp32 configs that failed (16 rows, block_kv 128, 3 stages: 270368 bytes; 128 rows,
    2 stages: 262144); above what Triton took for the bf16 defaults (ncu: 74 KB decode, 164 KB
    prefill). The 16-row path beside a bigger tile reuses this memory (the lax.cond branches
    are never live together): the bigger tile counts."""
    rows = cfg.block_q * _next_pow2(group)
    kv_and_q = (max(1, cfg.num_stages - 1) * 2 * cfg.block_kv + rows) * head_dim
    p_tile = rows * cfg.block_kv if rows >= 64 else 0
    return (kv_and_q + p_tile) * itemsize


def fit_config(cfg: GpuBlockConfig, group: int, head_dim: int, itemsize: int) -> GpuBlockConfig:
    """Shrink `cfg` (fewer stages first, then smaller KV tiles) until it fits shared memory.

    Tiles are tuned for bf16; fp32 doubles every tile, and an oversized config fails at run
    time (RESOURCE_EXHAUSTED), so the dtype decides the final shape.
    """
    while smem_bytes(cfg, group, head_dim, itemsize) > _SMEM_BUDGET:
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_kv > 16:
            cfg = dataclasses.replace(cfg, block_kv=cfg.block_kv // 2)
        else:
            break
    return cfg


def default_config(
    num_tokens: int, num_requests: int, num_heads: int, num_kv_heads: int, page_size: int
) -> GpuBlockConfig:
    """Tiles tuned on an H200 (docs/kernel_notes.md), bf16, head_dim 128.

    Decode-like batches (T <= 2R): 16-row tiles, 128 keys a step, 3 stages; split-K only below
    ~256 (request, kv head) pairs, up to 8 ways (a batch of 1: 8 splits; >= 32 requests at 8
    kv heads: none; more splits cost more in the merge than they save); 8 warps unsplit below
    1024 pairs, else 4 (the faster of the two at each measured batch: 1, 8, 16, 32, 256),
    except in two buckets of 32 query / 8 kv heads: 64 requests, 64 keys, 4 warps (measured
    at 40-64 requests; other head layouts and the 128-request bucket were not); 16 requests,
    64 keys split 4 ways, 4 warps (measured at 1-16 requests in that bucket).
    Otherwise blocks of few tokens take 16-row tiles and the rest: with up to 8 requests
    (prefill-heavy) 128-row tiles, 8 warps; with more (decodes beside chunks) 64-row tiles,
    64 keys, 4 warps: smaller tiles leave shared memory for two programs an SM, which the
    decodes' streaming needs more than the chunks need bigger MMAs.
    """
    del page_size  # the gather works by slot: tiles need not align with pages
    group = _next_pow2(num_heads // num_kv_heads)
    if num_tokens <= 2 * num_requests:
        pairs = max(1, num_requests * num_kv_heads)
        llama_8b_heads = num_heads == 32 and num_kv_heads == 8  # the layout measured
        if llama_8b_heads and 32 < num_requests <= 64:
            # The 64-request bucket of Llama-3-8B's / Qwen3-8B's head layout (the one
            # measured): small programs, several an SM (512 with work, about one wave). H200,
            # kernel alone: 1-21 % faster at 40-64 requests and 640-4,096 tokens; in the
            # forward at 64 x 640, 1.49 against 1.70 ms a step (H100, same call: 2.12
            # against 2.29). docs/BENCHMARKS.md, fourteenth session.
            return GpuBlockConfig(max(1, _MIN_ROWS // group), 64, num_warps=4, num_stages=3)
        if llama_8b_heads and 8 < num_requests <= 16:
            # The 16-request bucket of the same layout, which the engine's default ladders run
            # every step of 1-16 decodes in: 64 keys, split 4 ways, 4 warps. H200, one call
            # (kernel, block table, split merge) padded to the bucket, 1-16 requests of 384-
            # 2,048 tokens: 2-12 % faster than 128 keys split 2 ways (2 x 384: 1 % slower); in
            # the forward at 12 x 1,100, attention 0.65 against 0.73 ms a step.
            # docs/BENCHMARKS.md, fifteenth session.
            return GpuBlockConfig(max(1, _MIN_ROWS // group), 64, 4, num_warps=4, num_stages=3)
        splits = min(8, _next_pow2(256 // pairs + 1) // 2) if pairs < 256 else 1
        return GpuBlockConfig(
            block_q=max(1, _MIN_ROWS // group),
            block_kv=128,
            num_splits=max(1, splits),
            num_warps=8 if splits == 1 and pairs < 1024 else 4,
            num_stages=3,
        )
    if num_requests > 8:
        return GpuBlockConfig(max(1, 64 // group), block_kv=64, num_warps=4, num_stages=3)
    return GpuBlockConfig(max(1, 128 // group), block_kv=128, num_warps=8, num_stages=3)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What every program knows at trace time."""

    sm_scale: float
    sliding_window: int | None
    soft_cap: float | None
    group: int
    page_size: int
    cfg: GpuBlockConfig
    num_heads: int  # N: q and the output are viewed as [T * N, H]


def _kernel(
    blocks_ref,  # [NB, NUM_FIELDS] int32
    page_table_ref,  # [R, P] int32
    q_ref,  # [T * N, H]
    kv_ref,  # [2, K, num_pages * S, H]
    *out_refs,  # o [splits?, T, N, H] (+ m, l [splits, T, N] fp32 when split)
    st: _Static,
):
    cfg = st.cfg
    # Heaviest blocks first: a request's later query blocks see more keys (causal), so
    # launching them first shortens the tail of the last wave.
    b = pl.num_programs(0) - 1 - pl.program_id(0)
    blk_lo = blocks_ref[b, rb.KV_BLK_LO]
    blk_hi = blocks_ref[b, rb.KV_BLK_HI]
    # This split's share of the KV blocks.
    per_split = jax.lax.div(blk_hi - blk_lo + cfg.num_splits - 1, cfg.num_splits)
    # Program ids are read here, outside lax.cond: interpret mode cannot see them inside.
    h, split = pl.program_id(1), pl.program_id(2)
    lo = blk_lo + split * per_split
    hi = jnp.minimum(lo + per_split, blk_hi)
    tok_start = blocks_ref[b, rb.TOK_START]
    tok_end = blocks_ref[b, rb.TOK_END]
    attend = functools.partial(
        _attend,
        (page_table_ref, q_ref, kv_ref, out_refs),
        (h, split, blocks_ref[b, rb.REQ], tok_start, tok_end, blocks_ref[b, rb.POS_START], lo, hi),
        st=st,
    )
    small_q = max(1, _MIN_ROWS // _next_pow2(st.group))

    def run():
        if cfg.block_q <= small_q:
            attend(cfg.block_q)
        else:
            # A block of few tokens (a decode beside prefill chunks) takes the smallest tile:
            # the big one would spend block_q / small_q times the MMA work on masked rows.
            jax.lax.cond(
                tok_end - tok_start <= small_q,
                lambda: attend(small_q),
                lambda: attend(cfg.block_q),
            )

    # The grid is a static bound: up to R + 1 surplus blocks (257 of 1,281 in a decode step at
    # 1,024 requests) have no tokens. They leave at once instead of loading q and storing
    # masked lanes: 328.5 -> 320.6 us for a decode call at 1,024 requests of 200 tokens (H100).
    jax.lax.cond(tok_end > tok_start, run, lambda: None)


def _attend(refs, scalars, bq: int, *, st: _Static):
    """One query block as a `[bq * Gp, H]` tile: load q, walk the KV blocks, store."""
    page_table_ref, q_ref, kv_ref, out_refs = refs
    h, split, req, tok_start, tok_end, pos_start, lo, hi = scalars
    pages_per_req = page_table_ref.shape[1]
    head_dim = kv_ref.shape[3]
    group, page_size, window = st.group, st.page_size, st.sliding_window
    gp = _next_pow2(group)
    bkv = st.cfg.block_kv
    rows = bq * gp

    # Query rows, token-major and head-minor: row r is token tok_start + r // Gp and head
    # h * G + r % Gp, a row of q viewed as [T * N, H]. One gather of rows, no 3-D tile to
    # reshape (2,048-token prefill on an H100: 164 -> 135 us). Rows past the block or past G
    # read row 0 and are never stored.
    r = jnp.arange(rows)
    row_tok, row_head = r // gp, r % gp  # token in the block, head in the group
    row_valid = (tok_start + row_tok < tok_end) & (row_head < group)  # [rows]
    row_idx = jnp.where(row_valid, (tok_start + row_tok) * st.num_heads + h * group + row_head, 0)
    q = q_ref[row_idx, :]  # [rows, H]
    row_pos = pos_start + row_tok
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    # Softmax in base 2 (exp2 is the native instruction). Without a cap, the scale is applied
    # inside exp2's argument (`s * c - m`: one FMA an element), and m is kept scaled.
    scale = st.sm_scale * _LOG2E

    def body(j, carry, *, masked: bool):
        acc, m_prev, l_prev = carry
        key_pos = j * bkv + jnp.arange(bkv)
        # Keys past the page table are past kv_len too (masked): clamp, read a valid page.
        pages = page_table_ref[req, jnp.minimum(key_pos // page_size, pages_per_req - 1)]
        slots = pages * page_size + key_pos % page_size
        k = kv_ref[0, h, slots]  # [bkv, H]
        v = kv_ref[1, h, slots]
        s = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # [rows, bkv]
        c = scale
        if st.soft_cap is not None:
            s = (st.soft_cap * _LOG2E) * jnp.tanh(s * (st.sm_scale / st.soft_cap))
            c = 1.0
        if masked:
            mask = key_pos[None, :] <= row_pos[:, None]
            if window is not None:
                mask &= key_pos[None, :] > row_pos[:, None] - window
            s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m_prev, s.max(axis=1) * c)
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s * c - m_new[:, None])
        if masked:  # a row with every key masked so far has m_new = _MASK * c: exp2(0) = 1
            p = jnp.where(mask, p, 0.0)
        pv = jax.lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return acc * alpha[:, None] + pv, m_new, l_prev * alpha + p.sum(axis=1)

    # KV blocks [full_lo, full_hi) are visible to every row of the tile: no mask there.
    full_lo = lo
    if window is not None:  # keys inside the last row's window
        pos_last = pos_start + (tok_end - tok_start) - 1
        full_lo = jnp.clip(jax.lax.div(jnp.maximum(pos_last - window + bkv, 0), bkv), lo, hi)
    full_hi = jnp.clip((pos_start + 1) // bkv, full_lo, hi)  # keys up to the first row
    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), _MASK, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    masked_body = functools.partial(body, masked=True)
    if window is not None:
        carry = jax.lax.fori_loop(lo, full_lo, masked_body, carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    acc, m, l_sum = jax.lax.fori_loop(full_hi, hi, masked_body, carry)
    # The store goes by (token, head) tile, masked: a 3-D tile, reshaped once.
    tok_valid = tok_start + jnp.arange(bq) < tok_end  # [bq]
    mask2 = tok_valid[:, None] & (jnp.arange(gp) < group)[None, :]  # [bq, gp]
    tile_mask = jnp.broadcast_to(mask2[:, :, None], (bq, gp, head_dim))
    o_idx = (pl.ds(tok_start, bq), pl.ds(h * group, gp), slice(None))
    if st.cfg.num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l_sum == 0.0, 1.0, l_sum)[:, None]  # l == 0: padding rows, write 0
        plgpu.store(
            o_ref.at[o_idx], out.reshape(bq, gp, head_dim).astype(o_ref.dtype), mask=tile_mask
        )
    else:
        o_ref, m_ref, l_ref = out_refs
        idx = (split, *o_idx)
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
    `config` is shrunk to fit shared memory at q's dtype (see `fit_config`).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, num_pages, page_size, _ = kv_cache.shape
    num_requests = kv_lens.shape[0]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert head_dim & (head_dim - 1) == 0, "Triton tiles need a power-of-two head_dim"
    group = num_heads // num_kv_heads
    cfg = config or default_config(num_tokens, num_requests, num_heads, num_kv_heads, page_size)
    cfg = fit_config(cfg, group, head_dim, jnp.dtype(q.dtype).itemsize)
    assert cfg.block_kv & (cfg.block_kv - 1) == 0, f"{cfg.block_kv=} must be a power of two"
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
    st = _Static(sm_scale, sliding_window, soft_cap, group, page_size, cfg, num_heads)
    kernel = functools.partial(_kernel, st=st)
    kv_flat = kv_cache.reshape(2, num_kv_heads, num_pages * page_size, head_dim)  # a bitcast
    q_rows = q.reshape(num_tokens * num_heads, head_dim)  # a bitcast too
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(blocks, page_table.astype(jnp.int32), q_rows, kv_flat)
    if cfg.num_splits == 1:
        return outs[0]
    return _merge_splits(*outs, q.dtype)
