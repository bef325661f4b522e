"""Prompt-chunk attention for Hopper GPUs: Pallas on Mosaic GPU (TMA, wgmma, warp specialisation).

The same contract as `gpu_ragged_paged_attention` (ragged batch, paged cache, causal), built
the way FlashAttention-3 is, after jax's `pallas.ops.gpu.attention_mgpu`: a CTA takes
`2 * block_q` query rows of one query head of one request, with three warpgroups. Two compute
warpgroups run `block_q` rows each (QK^T and PV on wgmma, online softmax in fp32 between them),
and a memory warpgroup streams the request's keys and values `block_kv` at a time into a ring
of `max_concurrent_steps` shared-memory slots. The Triton kernel gathers K/V by slot with
plain loads; here each `block_kv` step is `block_kv / S` TMA copies, one per page (a page of
one head is a contiguous `[S, H]` box), all counted on the slot's barrier.

Ragged rows: a CTA's rows never straddle requests (`tile_table`). Its q tile starts on the
8-row grid (TMA into a tiled tile needs it), at or before the request's first row, and may run
past its end; the rows outside the request are computed but never stored: the output leaves
shared memory in TMA copies of 64, 32, ..., 1 rows, the binary digits of the row count (the
"ladder" of jax's `ragged_dot_mgpu`), so no row of another request is overwritten. The engine
uses this kernel beside Triton for prompt chunks when asked (`PAGEJAX_GPU_PREFILL`, dispatch.py).

Causal masking runs only on the key blocks that cross a compute warpgroup's diagonal. Rows of
the padding pseudo-request see no keys and are written as zeros. Not supported here (the
Triton kernel serves them): sliding windows, soft caps, fp32, head_dim other than 64 or 128,
pages under 8 rows (`supports`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import ragged_blocks as rb

_LOG2E = math.log2(math.e)
_COMPUTE_WGS = 2
# A TMA copy into a tiled (8, 64) shared-memory tile starts at a multiple of 8 rows: a q tile
# starting anywhere else loads the wrong rows. So tiles start at rows that are multiples of 8.
_ROW_ALIGN = 8
# Columns of the [NT, _NUM_FIELDS] int32 tile table.
_REQ, _ROW0, _TOK_START, _TOK_END, _POS0, _KV_BLK_HI = range(6)
_NUM_FIELDS = 6


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Tile sizes (static). A CTA takes `2 * block_q` query rows; block_q and block_kv are
    multiples of 64 (wgmma tiles), block_kv a multiple of the page size."""

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    # Launch the tiles last first: a request's later tiles see more keys, so the long ones
    # start in the first wave instead of trailing it.
    reverse: bool = True


def supports(
    q_dtype, cache_dtype, head_dim: int, page_size: int, sliding_window, soft_cap, cfg=None
) -> bool:
    """Whether this kernel serves the call (else the Triton kernel does). Pages land in the
    (8, 64)-tiled K/V tiles at multiples of their size, so a page is 8 rows or more; head_dim
    above 128 would take more shared memory than a CTA has (1,536 bytes a unit of head_dim)."""
    cfg = cfg or MgpuConfig()
    return (
        jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and jnp.dtype(q_dtype) == jnp.dtype(cache_dtype)
        and head_dim in (64, 128)
        and page_size % _ROW_ALIGN == 0
        and cfg.block_kv % page_size == 0
        and sliding_window is None
        and soft_cap is None
    )


def tile_table(
    query_start: jax.Array,
    kv_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    num_tokens: int,
    rows: int,
    block_kv: int,
    active: jax.Array | None = None,
    min_q_len: int = 1,
) -> jax.Array:
    """Tiles of `rows` q rows on the 8-row grid: [NT, _NUM_FIELDS] int32.

    A request's tiles start at its first row rounded down to a multiple of 8, then every
    `rows` rows. Per tile: _REQ (page-table row), _ROW0 (its first q row), _TOK_START/_TOK_END
    (the rows it writes: its request's rows inside it), _POS0 (the position of row _ROW0 in
    its request, negative for rows before the request), _KV_BLK_HI (key blocks its last row
    sees; 0 for the padding pseudo-request and surplus tiles, which write zeros / nothing).
    active: [R + 1] bool (see `ragged_blocks.request_extents`), or None (all). NT =
    cdiv(T, rows) + 2 A bounds the tiles of A requests (the padding rows count as one): A =
    R + 1, or at most T // min_q_len when every active request has `min_q_len` rows or more.
    """
    num_requests = kv_lens.shape[0]
    starts, lens, kv = rb.request_extents(query_start, kv_lens, num_seqs, num_tokens, active)
    first_row = starts - starts % _ROW_ALIGN
    per_request = jnp.where(lens > 0, -(-(starts + lens - first_row) // rows), 0)
    ends = jnp.cumsum(per_request)
    # A request's tiles cover its rows and at most 7 before them: under len / rows + 2 tiles.
    max_requests = num_requests + 1
    if active is not None:
        max_requests = min(max_requests, max(num_tokens // min_q_len, 1))
    nt = -(-num_tokens // rows) + 2 * max_requests
    t = jnp.arange(nt, dtype=jnp.int32)
    owner = jnp.searchsorted(ends, t, side="right", method="scan_unrolled").astype(jnp.int32)
    used = owner <= num_requests  # owner R is the padding pseudo-request, R + 1 surplus
    o = jnp.minimum(owner, num_requests)
    row0 = first_row[o] + (t - (ends[o] - per_request[o])) * rows
    tok_start = jnp.where(used, jnp.maximum(row0, starts[o]), 0)
    tok_end = jnp.where(used, jnp.minimum(row0 + rows, starts[o] + lens[o]), 0)
    row0 = jnp.where(used, row0, 0)
    pos0 = kv[o] - lens[o] + (row0 - starts[o])
    real = owner < num_requests
    blk_hi = jnp.where(real, (pos0 + tok_end - row0 - 1) // block_kv + 1, 0)
    req = jnp.where(real, owner, 0)
    fields = [req, row0, tok_start, tok_end, pos0, jnp.maximum(blk_hi, 0)]
    return jnp.stack(fields, axis=1).astype(jnp.int32)


def ragged_paged_prefill(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    query_start: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    config: MgpuConfig | None = None,
    active: jax.Array | None = None,
    min_q_len: int = 1,
) -> jax.Array:
    """Causal ragged paged attention on Mosaic GPU; the arguments as in
    `reference.ragged_paged_attention_reference`: q [T, N, H], kv_cache [2, K, P, S, H],
    kv_lens [R], page_indices [R, maxP], query_start [R + 1], num_seqs [1]. Returns [T, N, H].

    active, min_q_len: only the active requests' rows are written (see `tile_table`); the
    others are left for another kernel.
    """
    cfg = config or MgpuConfig()
    if q.shape[0] % _ROW_ALIGN:  # TMA views q as 8-row tiles: pad the rows (copies q)
        pad = _ROW_ALIGN - q.shape[0] % _ROW_ALIGN
        q_padded = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
        out = ragged_paged_prefill(
            q_padded,
            kv_cache,
            kv_lens,
            page_indices,
            query_start,
            num_seqs,
            sm_scale=sm_scale,
            config=config,
            active=active,
            min_q_len=min_q_len,
        )
        return out[: q.shape[0]]
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_cache.shape
    if not supports(q.dtype, kv_cache.dtype, head_dim, page_size, None, None, cfg):
        raise NotImplementedError(
            f"mgpu prefill: dtype {q.dtype}/{kv_cache.dtype}, head_dim {head_dim}, "
            f"page size {page_size}"
        )
    group = num_heads // num_kv_heads
    block_q, block_kv, steps_in_flight = cfg.block_q, cfg.block_kv, cfg.max_concurrent_steps
    pages_per_step = block_kv // page_size
    max_pages = page_indices.shape[1]
    dtype = q.dtype
    tiles = tile_table(
        query_start,
        kv_lens,
        num_seqs,
        num_tokens=num_tokens,
        rows=_COMPUTE_WGS * block_q,
        block_kv=block_kv,
        active=active,
        min_q_len=min_q_len,
    )
    num_tiles = tiles.shape[0]
    # The tile table and the page table in one fresh int32 buffer: Mosaic GPU wants its
    # operands 256-byte aligned, and the engine's page table is a slice of a packed input.
    pages_at = tiles.size
    meta = jnp.concatenate([tiles.reshape(-1), page_indices.astype(jnp.int32).reshape(-1)])
    scale_log2 = sm_scale * _LOG2E

    def kernel(q_ref, kv_ref, meta_ref, out_ref, scoped):
        smem, (k_ready, v_ready, q_ready), (k_free, v_free), schedule = scoped
        q_smem2, o_smem2, k_smem, v_smem = smem
        q_head = lax.axis_index("heads")
        tile = lax.axis_index("tiles")
        if cfg.reverse:
            tile = num_tiles - 1 - tile
        wg = lax.axis_index("wg")
        field = lambda f: meta_ref[tile * _NUM_FIELDS + f]
        req, row0, pos0, blk_hi = field(_REQ), field(_ROW0), field(_POS0), field(_KV_BLK_HI)
        tok_start, tok_end = field(_TOK_START), field(_TOK_END)

        def wg_rows(w):
            """Compute warpgroup w's rows: (first q row, its first and end valid rows, kv steps)."""
            base = row0 + w * block_q
            lo = jnp.clip(tok_start - base, 0, block_q)
            hi = jnp.clip(tok_end - base, 0, block_q)
            last_pos = pos0 + w * block_q + hi - 1
            steps = jnp.where(hi > lo, jnp.clip(last_pos // block_kv + 1, 0, blk_hi), 0)
            return base, lo, hi, steps

        tile_steps = jnp.maximum(wg_rows(0)[3], wg_rows(1)[3])

        def schedule_barrier():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        # Tiles with no rows (surplus, or requests left to another kernel) return at once.
        @pl.when(tok_end > tok_start)
        def _tile():
            @pl.when(wg < _COMPUTE_WGS)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
                base, lo, hi, steps = wg_rows(wg)
                first_pos = pos0 + wg * block_q  # of row `base` (< 0: rows before the request)
                # Key blocks wholly at or before this warpgroup's first position need no mask.
                full_steps = jnp.clip((first_pos + 1) // block_kv, 0, steps)
                plgpu.copy_gmem_to_smem(
                    q_ref.at[pl.ds(base, block_q), q_head], q_smem, q_ready.at[wg]
                )
                plgpu.barrier_wait(q_ready.at[wg])
                m_i = plgpu.layout_cast(
                    jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
                )
                l_i = plgpu.layout_cast(
                    jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
                )
                acc = plgpu.layout_cast(
                    jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA
                )

                @pl.when(steps > 0)
                def _():
                    plgpu.barrier_wait(k_ready.at[0])

                pl.when(wg == 1)(schedule_barrier)

                def kv_step(step, carry, masked: bool):
                    acc, m_i, l_i = carry
                    slot = lax.rem(step, steps_in_flight)

                    def qk_scope(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        schedule_barrier()
                        return acc_ref[...]

                    s = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    if masked:
                        row = plgpu.broadcasted_iota(
                            jnp.int32, (block_q, block_kv), 0, layout=plgpu.Layout.WGMMA
                        )
                        col = plgpu.broadcasted_iota(
                            jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA
                        )
                        s = jnp.where(row + first_pos >= col + step * block_kv, s, -jnp.inf)
                    # m is kept in log2 units of the scaled scores, so p is one FMA and an exp2.
                    m_new = jnp.maximum(m_i, s.max(axis=1) * scale_log2)
                    alpha = jnp.exp2(m_i - m_new)
                    p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                    acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l_i = l_i * alpha + p.sum(axis=1)
                    p16 = p.astype(dtype)
                    # As in jax's FA3 kernel: this ordering measurably matters to ptxas.
                    acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                    plgpu.barrier_arrive(schedule)
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_wait(schedule)

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                        @pl.when(step + 1 < steps)
                        def _():
                            plgpu.barrier_wait(k_ready.at[lax.rem(step + 1, steps_in_flight)])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l_i

                def drain(step, _):
                    # Steps the other warpgroup needs: release the slots, keep the schedule in step.
                    slot = lax.rem(step, steps_in_flight)
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    schedule_barrier()
                    schedule_barrier()

                carry = (acc, m_i, l_i)
                carry = lax.fori_loop(
                    0, full_steps, functools.partial(kv_step, masked=False), carry
                )
                carry = lax.fori_loop(
                    full_steps, steps, functools.partial(kv_step, masked=True), carry
                )
                acc, m_i, l_i = carry
                lax.fori_loop(steps, tile_steps, drain, None)
                pl.when(wg == 0)(schedule_barrier)

                # Rows that saw no key (the padding pseudo-request) are written as zeros.
                inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
                acc *= lax.broadcast_in_dim(inv, acc.shape, [0])
                o_smem[...] = acc.astype(dtype)
                plgpu.commit_smem()
                # Store exactly rows [lo, hi): one TMA copy per set bit of the count.
                rows, start, size = hi - lo, lo, block_q
                while size:

                    @pl.when((rows & size) != 0)
                    def _(n=size, start=start):
                        plgpu.copy_smem_to_gmem(
                            o_smem2.at[wg, pl.ds(start, n)],
                            out_ref.at[pl.ds(base + start, n), q_head],
                        )

                    start = start + (rows & size)
                    size //= 2
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == _COMPUTE_WGS)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                kv_head = lax.div(q_head, jnp.int32(group))

                def fetch(step, slot):
                    for j in range(pages_per_step):
                        idx = jnp.minimum(step * pages_per_step + j, max_pages - 1)
                        page = meta_ref[pages_at + req * max_pages + idx]
                        rows = pl.ds(j * page_size, page_size)
                        plgpu.copy_gmem_to_smem(
                            kv_ref.at[0, kv_head, page], k_smem.at[slot, rows], k_ready.at[slot]
                        )
                        plgpu.copy_gmem_to_smem(
                            kv_ref.at[1, kv_head, page], v_smem.at[slot, rows], v_ready.at[slot]
                        )

                for i in range(steps_in_flight):

                    @pl.when(i < tile_steps)
                    def _(i=i):
                        fetch(jnp.int32(i), i)

                @pl.loop(0, jnp.maximum(tile_steps - steps_in_flight, 0))
                def _(step):
                    slot = lax.rem(step, steps_in_flight)
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])
                    fetch(step + steps_in_flight, slot)

    def entry(q_ref, kv_ref, meta_ref, out_ref):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((_COMPUTE_WGS, block_q, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((_COMPUTE_WGS, block_q, head_dim), dtype),
            plgpu.SMEM((steps_in_flight, block_kv, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((steps_in_flight, block_kv, head_dim), dtype, transforms=tiled),
        )
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, kv_ref, meta_ref, out_ref, scoped),
            smem,
            (
                plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=steps_in_flight),
                plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=steps_in_flight),
                plgpu.Barrier(num_barriers=_COMPUTE_WGS),
            ),
            (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=steps_in_flight),) * 2,
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(num_heads, num_tiles),
        grid_names=("heads", "tiles"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        # Lane semantics: jax 0.10's default; 0.11 defaults to warpgroup semantics, whose layout
        # inference rejects the row-ladder stores (dynamic row offsets in shared memory).
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane
        ),
    )(q, kv_cache, meta)
