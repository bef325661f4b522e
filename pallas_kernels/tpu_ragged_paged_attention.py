"""Ragged paged attention for TPUs: Pallas with the Mosaic lowering.

Grid: (query block, kv head). The query block table and the page table are scalar-prefetched
into SMEM. Queries are re-laid out outside the kernel into aligned tiles, `[K, NB, rows, H]`
with `rows = block_q * G` (token-major, head-minor), so every kernel block is a plain,
aligned BlockSpec block: Mosaic has no masked stores, and a ragged block written in place would
clobber its neighbours. The output comes back in the same layout and a jnp gather puts each
token where it belongs (both gathers move T * N * H elements, small next to the KV reads).

KV pages stay in HBM (`pl.ANY`). Each inner step needs `block_kv` keys = `block_kv / S` pages
of K and of V, fetched page by page with `make_async_copy` into one slot of a double-buffered
VMEM scratch `[2 slots, 2 (k/v), block_kv, H]`; step j+1's copies are started before step j
waits on its own, so the DMAs overlap the matmuls. One DMA semaphore per slot.

Written in the subset that both Mosaic and the CPU interpreter accept: no ref reshapes or
bitcasts, no masked stores, no integer vector division (row -> token uses an exact float
multiply instead).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import ragged_blocks as rb

_LOG2E = math.log2(math.e)
_MASK = -1e30  # finite: fully masked rows must not produce NaN in the online softmax


@dataclasses.dataclass(frozen=True)
class TpuBlockConfig:
    """Tile sizes (static). block_q * G should be a multiple of 16 (bf16 sublane tile)."""

    block_q: int
    block_kv: int  # a multiple of the page size; a multiple of 128 keeps scores lane-dense


def default_config(
    num_tokens: int, num_requests: int, group: int, page_size: int
) -> TpuBlockConfig:
    """16 query rows for decode-like batches (T <= 2R), ~128 (one MXU tile) otherwise."""
    unit = 16 // math.gcd(group, 16)  # fewest tokens giving a multiple of 16 rows
    target_rows = 16 if num_tokens <= 2 * num_requests else 128
    block_q = unit * max(1, target_rows // (unit * group))
    return TpuBlockConfig(block_q=block_q, block_kv=max(128, page_size))


def _kernel(
    blocks_ref,  # SMEM [NB * NUM_FIELDS] int32
    page_table_ref,  # SMEM [R * P] int32
    q_ref,  # VMEM [rows, H]
    kv_hbm,  # HBM [2, K, num_pages, S, H]
    o_ref,  # VMEM [rows, H]
    kv_buf,  # VMEM [2, 2, block_kv, H]
    sems,  # DMA semaphores [2]
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    pages_per_req: int,
    block_kv: int,
):
    b, h = pl.program_id(0), pl.program_id(1)
    page_size = kv_hbm.shape[3]
    pages_per_blk = block_kv // page_size
    rows, head_dim = q_ref.shape
    base = b * rb.NUM_FIELDS
    req = blocks_ref[base + rb.REQ]
    pos_start = blocks_ref[base + rb.POS_START]
    lo = blocks_ref[base + rb.KV_BLK_LO]
    hi = blocks_ref[base + rb.KV_BLK_HI]

    def copies(j, slot):
        """The 2 * pages_per_blk page copies of KV block j into buffer slot `slot`."""
        out = []
        for i in range(pages_per_blk):
            # Past the table's end (block_kv not dividing P * S): any page, its keys are masked.
            p = jnp.minimum(j * pages_per_blk + i, pages_per_req - 1)
            page = page_table_ref[req * pages_per_req + p]
            for kv in range(2):
                out.append(
                    pltpu.make_async_copy(
                        kv_hbm.at[kv, h, page],
                        kv_buf.at[slot, kv, pl.ds(i * page_size, page_size)],
                        sems.at[slot],
                    )
                )
        return out

    @pl.when(lo < hi)
    def _():
        for c in copies(lo, 0):
            c.start()

    q = q_ref[...]
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    # Row r holds token r // group; float multiply is exact here (rows << 2**22).
    row = jax.lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0).astype(jnp.float32)
    row_tok = ((row + 0.5) * (1.0 / group)).astype(jnp.int32)
    row_pos = pos_start + row_tok  # [rows, block_kv]
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        slot = jax.lax.rem(j - lo, 2)

        @pl.when(j + 1 < hi)
        def _():
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        k = kv_buf[slot, 0]
        v = kv_buf[slot, 1]
        s = (
            jax.lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            * sm_scale
        )  # [rows, block_kv]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = s * _LOG2E
        key_pos = j * block_kv + col
        mask = key_pos <= row_pos
        if sliding_window is not None:
            mask = jnp.logical_and(mask, key_pos > row_pos - sliding_window)
        s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.where(mask, jnp.exp2(s - m_new), 0.0)
        pv = jax.lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return acc * alpha + pv, m_new, l_prev * alpha + p.sum(axis=1, keepdims=True)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows, 1), _MASK, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
    )
    acc, _, l_sum = jax.lax.fori_loop(lo, hi, body, init)
    # l_sum == 0: padding rows and empty blocks, whose output is zero.
    o_ref[...] = (acc / jnp.where(l_sum == 0.0, 1.0, l_sum)).astype(o_ref.dtype)


def _to_blocks(q: jax.Array, blocks: jax.Array, block_q: int, num_kv_heads: int) -> jax.Array:
    """q: [T, N, H] -> [K, NB, block_q * G, H]; rows past a block's end are zeros."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    tok = blocks[:, rb.TOK_START, None] + jnp.arange(block_q)[None, :]  # [NB, bq]
    valid = tok < blocks[:, rb.TOK_END, None]
    qb = q.reshape(num_tokens, num_kv_heads, group, head_dim)[jnp.where(valid, tok, 0)]
    qb = jnp.where(valid[:, :, None, None, None], qb, 0)  # [NB, bq, K, G, H]
    nb = blocks.shape[0]
    return qb.transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, nb, block_q * group, head_dim)


def _from_blocks(
    ob: jax.Array, query_start: jax.Array, num_seqs: jax.Array, num_tokens: int, block_q: int
) -> jax.Array:
    """ob: [K, NB, block_q * G, H] -> [T, N, H]; padding tokens get zeros."""
    num_kv_heads, nb, rows, head_dim = ob.shape
    group = rows // block_q
    block, offset, valid = rb.token_rows(
        query_start, num_seqs, num_tokens=num_tokens, block_q=block_q
    )
    ob = ob.reshape(num_kv_heads, nb, block_q, group, head_dim)
    out = ob[:, block, offset]  # [K, T, G, H]
    out = jnp.where(valid[None, :, None, None], out, 0)
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_kv_heads * group, head_dim)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "config"))
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
    config: TpuBlockConfig | None = None,
) -> jax.Array:
    """Same contract as `ragged_paged_attention_reference` (see reference.py).

    q: [T, N, H]; kv_cache: [2, K, num_pages, S, H]; kv_lens: [R]; page_table: [R, P];
    query_start: [R + 1]; num_seqs: [1]. Returns [T, N, H] in q's dtype.
    On the CPU, call it under `pltpu.force_tpu_interpret_mode()`.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_cache.shape
    num_requests, pages_per_req = page_table.shape
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    group = num_heads // num_kv_heads
    cfg = config or default_config(num_tokens, num_requests, group, page_size)
    assert cfg.block_kv % page_size == 0, f"{cfg.block_kv=} must be a multiple of {page_size=}"
    blocks = rb.query_blocks(
        query_start,
        kv_lens,
        num_seqs,
        num_tokens=num_tokens,
        block_q=cfg.block_q,
        block_kv=cfg.block_kv,
        sliding_window=sliding_window,
    )
    nb = blocks.shape[0]
    rows = cfg.block_q * group
    qb = _to_blocks(q, blocks, cfg.block_q, num_kv_heads)
    tile = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, *_: (h, b, 0, 0))
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        group=group,
        pages_per_req=pages_per_req,
        block_kv=cfg.block_kv,
    )
    ob = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(nb, num_kv_heads),
            in_specs=[tile, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=tile,
            scratch_shapes=[
                pltpu.VMEM((2, 2, cfg.block_kv, head_dim), kv_cache.dtype),
                pltpu.SemaphoreType.DMA((2,)),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qb.shape, q.dtype),
        # No state crosses grid steps (each step primes its own buffers): both axes parallel.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        name="ragged_paged_attention",
    )(blocks.reshape(-1), page_table.astype(jnp.int32).reshape(-1), qb, kv_cache)
    return _from_blocks(ob, query_start, num_seqs, num_tokens, cfg.block_q)
