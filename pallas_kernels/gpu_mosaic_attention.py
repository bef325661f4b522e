"""Ragged paged attention for Hopper GPUs: Pallas on Mosaic GPU (TMA, wgmma, warp
specialisation), one persistent launch for a whole step: prompt chunks and decodes.

Same contract as `gpu_ragged_paged_attention` (ragged batch, paged cache, causal), built the way
FlashAttention-3 is, after jax's `pallas.ops.gpu.attention_mgpu`: a CTA has three warpgroups.
Two compute warpgroups run 64 query rows each (QK^T and PV on wgmma, online softmax in fp32
between them, ping-ponged on a schedule barrier), and a memory warpgroup streams the keys and
values `block_kv` at a time into a ring of `max_concurrent_steps` shared-memory slots, as
`block_kv / S` TMA copies (a page of one head is a contiguous `[S, H]` box).

Work items (`work_lists`, `WorkItems`), one CTA per SM walking its share of one merged list:
- A prompt tile: `2 * block_q` rows of one query head of one request with two or more new
  tokens (or of the padding rows, written as zeros). Its q tile starts on the 8-row grid (TMA
  into a tiled tile needs it), at or before the request's first row, and may run past its end;
  the rows outside the request are computed but never stored: the output leaves shared memory
  in TMA copies of 64, 32, ..., 1 rows, the binary digits of the row count (the "ladder" of
  jax's `ragged_dot_mgpu`). Causal masking runs only on the key blocks that cross a warpgroup's
  diagonal.
- A decode: one request with one new token, one KV head: warpgroup 0 loads the `G` query heads
  of the group (`max(G, 8)` heads from a multiple of that, G a power of two) into its tile
  and reads the request's keys once for all of them; the other rows are computed and never
  stored, and warpgroup 1 only keeps the schedule. The MMA work on unused rows is free beside
  the streaming.
The CTAs keep one count of key blocks across their items, so the barriers' phases run on from
item to item; a warpgroup waits for every block (its own or not) to keep them in step. The
next item's q loads while the current one's output is stored.

Not supported here (the Triton kernel serves them; `supports`): sliding windows, soft caps,
fp32, head_dim other than 64 or 128, pages that are no multiple of 8 rows or do not divide
`block_kv`, head groups that are no power of two, query heads that are no multiple of
`max(G, 8)`. The engine's choice between the two: dispatch.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import ragged_blocks as rb
from pallas_kernels.hardware import num_sms
from pallas_kernels.mgpu_compat import ask_ptxas_once, interpret_params

ask_ptxas_once()  # before any of this module's kernels lowers

_LOG2E = math.log2(math.e)
_COMPUTE_WGS = 2
# A TMA copy into a tiled (8, 64) shared-memory tile starts at a multiple of 8 rows: a q tile
# starting anywhere else loads the wrong rows. So tiles start at rows that are multiples of 8.
_ROW_ALIGN = 8
# Shared memory a Hopper CTA may take (227 KiB), less room for the barriers.
_SMEM_BYTES = 227 * 1024 - 1024
# Columns of the [NT, _NUM_FIELDS] int32 tile table.
_REQ, _ROW0, _TOK_START, _TOK_END, _POS0, _KV_BLK_HI = range(6)
_NUM_FIELDS = 6
# Columns of the [R, _NUM_DEC_FIELDS] int32 decode table.
_D_REQ, _D_ROW, _D_KV = range(3)
_NUM_DEC_FIELDS = 3


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Tile sizes (static). A CTA takes `2 * block_q` query rows; block_q is 64 (one wgmma tile a
    warpgroup; the only size run), block_kv a multiple of 64 and of the page size. All of it
    must fit a CTA's shared memory (`supports`)."""

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    num_ctas: int | None = None  # persistent CTAs; default one per SM


def supports(
    q_dtype,
    cache_dtype,
    head_dim: int,
    page_size: int,
    sliding_window,
    soft_cap,
    cfg=None,
    *,
    num_heads: int,
    num_kv_heads: int,
) -> bool:
    """Whether this kernel serves the call (else the Triton kernel does). Pages land in the
    (8, 64)-tiled K/V tiles at multiples of their size, so a page is 8 rows or more; head_dim
    above 128 would take more shared memory than a CTA has (1,536 bytes a unit of head_dim).
    A decode loads its head group as rows of an 8-row tile: groups of a power of two, heads
    a multiple of 8 (or of the group)."""
    cfg = cfg or MgpuConfig()
    group = num_heads // num_kv_heads
    itemsize = jnp.dtype(q_dtype).itemsize
    # q and output tiles of both compute warpgroups, and the K/V ring.
    smem = (4 * cfg.block_q + 2 * cfg.max_concurrent_steps * cfg.block_kv) * head_dim * itemsize
    return (
        cfg.block_q == 64
        and cfg.block_kv % 64 == 0
        and smem <= _SMEM_BYTES
        and jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and jnp.dtype(q_dtype) == jnp.dtype(cache_dtype)
        and head_dim in (64, 128)
        and page_size % _ROW_ALIGN == 0
        and cfg.block_kv % page_size == 0
        and sliding_window is None
        and soft_cap is None
        and group * num_kv_heads == num_heads
        and group & (group - 1) == 0
        and group <= cfg.block_q
        and num_heads % max(group, _ROW_ALIGN) == 0
    )


def tile_table(
    starts: jax.Array, lens: jax.Array, kv: jax.Array, *, num_tokens: int, rows: int, block_kv: int
) -> tuple[jax.Array, jax.Array]:
    """Tiles of `rows` q rows on the 8-row grid, for the requests of `request_extents` (starts,
    lens, kv: [R + 1], the padding pseudo-request last; a request with lens 0 gets no tile):
    ([NT, _NUM_FIELDS] int32, the number of used tiles, which come first).

    A request's tiles start at its first row rounded down to a multiple of 8, then every
    `rows` rows. Per tile: _REQ (page-table row), _ROW0 (its first q row), _TOK_START/_TOK_END
    (the rows it writes: its request's rows inside it), _POS0 (the position of row _ROW0 in
    its request, negative for rows before the request), _KV_BLK_HI (key blocks its last row
    sees; 0 for the padding pseudo-request and surplus tiles, which write zeros / nothing).
    NT = cdiv(T, rows) + 2 A bounds the tiles of A requests with rows (the padding rows count
    as one), A <= min(R + 1, T).
    """
    num_requests = lens.shape[0] - 1
    first_row = starts - starts % _ROW_ALIGN
    per_request = jnp.where(lens > 0, -(-(starts + lens - first_row) // rows), 0)
    # A request's tiles cover its rows and at most 7 before them: under len / rows + 2 tiles.
    max_requests = min(num_requests + 1, max(num_tokens, 1))
    nt = -(-num_tokens // rows) + 2 * max_requests
    owner, o, j = rb.assign_blocks(per_request, nt)
    used = owner <= num_requests  # owner R is the padding pseudo-request, R + 1 surplus
    row0 = first_row[o] + j * rows
    tok_start = jnp.where(used, jnp.maximum(row0, starts[o]), 0)
    tok_end = jnp.where(used, jnp.minimum(row0 + rows, starts[o] + lens[o]), 0)
    row0 = jnp.where(used, row0, 0)
    pos0 = kv[o] - lens[o] + (row0 - starts[o])
    real = owner < num_requests
    blk_hi = jnp.where(real, (pos0 + tok_end - row0 - 1) // block_kv + 1, 0)
    req = jnp.where(real, owner, 0)
    fields = [req, row0, tok_start, tok_end, pos0, jnp.maximum(blk_hi, 0)]
    return jnp.stack(fields, axis=1).astype(jnp.int32), jnp.sum(per_request)


def work_lists(
    query_start: jax.Array,
    kv_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    num_tokens: int,
    rows: int,
    block_kv: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel's two work lists: (tiles [NT, _NUM_FIELDS], decodes [R, _NUM_DEC_FIELDS],
    counts [2]: used tiles, decodes).

    Requests with one new token are decodes: one item per KV head (`_D_*` columns: page-table
    row, q row, kv_len), the first `counts[1]` rows. The other requests and the padding rows
    are prompt tiles (`tile_table`), the first `counts[0]` rows; each is one item per query head.
    """
    num_requests = kv_lens.shape[0]
    starts, lens, kv = rb.request_extents(query_start, kv_lens, num_seqs, num_tokens)
    decode = lens[:num_requests] == 1
    chunked = jnp.concatenate([~decode, jnp.ones((1,), bool)])  # padding rows: tiles
    tiles, num_tiles = tile_table(
        starts,
        jnp.where(chunked, lens, 0),
        kv,
        num_tokens=num_tokens,
        rows=rows,
        block_kv=block_kv,
    )
    (which,) = jnp.nonzero(decode, size=num_requests, fill_value=0)
    which = which.astype(jnp.int32)
    decodes = jnp.stack([which, query_start[which], kv[which]], axis=1).astype(jnp.int32)
    counts = jnp.stack([num_tiles, jnp.sum(decode)]).astype(jnp.int32)
    return tiles, decodes, counts


class Item(NamedTuple):
    """One work item: a prompt tile of one query head, or a decode of one KV head."""

    is_decode: jax.Array
    req: jax.Array  # page-table row
    kv_head: jax.Array
    q_head: jax.Array  # a prompt tile's query head
    tile: Callable[[int], jax.Array]  # a prompt tile's field (_REQ ...)
    decode: Callable[[int], jax.Array]  # a decode's field (_D_REQ ...)


@dataclasses.dataclass(frozen=True)
class WorkItems:
    """How a CTA finds its work in the int32 metadata (`meta`: counts, tiles, decodes, pages;
    see `work_lists`). The persistent CTAs take the merged list's items `cta`, `cta +
    num_ctas`, ...: prompt items (used tiles x query heads, the tile list reversed: a
    request's later tiles see more keys, and the padding rows' tiles, last in the list and
    free, come first) and decode items (decodes x KV heads). The two kinds alternate while
    both last, and within a round of `num_ctas` items even and odd CTAs take opposite kinds, so
    at any time some SMs stream decodes' keys while the others compute prompt tiles. Written in
    jnp on scalars (the kernel) or arrays of items (the tests' numpy model)."""

    num_heads: int
    num_kv_heads: int
    block_q: int
    block_kv: int
    num_ctas: int
    tiles_at: int
    decodes_at: int

    def count(self, meta) -> jax.Array:
        return meta[0] * self.num_heads + meta[1] * self.num_kv_heads

    def num_items_of(self, meta, cta) -> jax.Array:
        """How many items CTA `cta` takes: those at `cta + i * num_ctas`."""
        return jnp.maximum(self.count(meta) - cta + self.num_ctas - 1, 0) // self.num_ctas

    def item(self, meta, m) -> Item:
        num_tiles = meta[0]
        num_prompt_items = num_tiles * self.num_heads
        num_dec_items = meta[1] * self.num_kv_heads
        both = jnp.minimum(num_prompt_items, num_dec_items)
        paired = m < 2 * both
        is_dec = jnp.where(paired, lax.rem(m + m // self.num_ctas, 2) == 1, num_dec_items > both)
        idx = jnp.where(paired, m // 2, m - both)
        p = jnp.where(is_dec, 0, idx)
        tile = jnp.maximum(num_tiles - 1 - p // self.num_heads, 0)
        q_head = lax.rem(p, self.num_heads)
        d = jnp.where(is_dec, idx, 0)
        dec = d // self.num_kv_heads
        tfield = lambda f: meta[self.tiles_at + tile * _NUM_FIELDS + f]
        dfield = lambda f: meta[self.decodes_at + dec * _NUM_DEC_FIELDS + f]
        group = self.num_heads // self.num_kv_heads
        return Item(
            is_decode=is_dec,
            req=jnp.where(is_dec, dfield(_D_REQ), tfield(_REQ)),
            kv_head=jnp.where(is_dec, lax.rem(d, self.num_kv_heads), q_head // group),
            q_head=q_head,
            tile=tfield,
            decode=dfield,
        )

    def warpgroup(self, it: Item, w):
        """Compute warpgroup w's part of an item: (first q row, first and end rows it writes
        (of a prompt tile's rows from the first; of the group's heads for a decode), key blocks,
        position of its first row, position step between its rows)."""
        block_q, block_kv = self.block_q, self.block_kv
        # A prompt tile: rows [row0 + w * block_q, + block_q) of one query head.
        base = it.tile(_ROW0) + w * block_q
        lo = jnp.clip(it.tile(_TOK_START) - base, 0, block_q)
        hi = jnp.clip(it.tile(_TOK_END) - base, 0, block_q)
        first_pos = it.tile(_POS0) + w * block_q
        steps = jnp.where(
            hi > lo, jnp.clip((first_pos + hi - 1) // block_kv + 1, 0, it.tile(_KV_BLK_HI)), 0
        )
        # A decode: warpgroup 0 takes the group's heads, all at the last position; warpgroup 1
        # only keeps the schedule.
        kv_len = it.decode(_D_KV)
        mine = w == 0
        is_dec = it.is_decode
        return (
            jnp.where(is_dec, it.decode(_D_ROW), base),
            jnp.where(is_dec, 0, lo),
            jnp.where(is_dec, jnp.where(mine, self.num_heads // self.num_kv_heads, 0), hi),
            jnp.where(is_dec, jnp.where(mine, -(-kv_len // block_kv), 0), steps),
            jnp.where(is_dec, kv_len - 1, first_pos),
            jnp.where(is_dec, 0, 1),
        )

    @property
    def q_rows(self) -> int:
        """Query heads a decode item loads: its group, at least 8 (one tile row group)."""
        return max(self.num_heads // self.num_kv_heads, _ROW_ALIGN)

    def decode_heads(self, it: Item):
        """Where a decode's query heads are: (the first of the `q_rows` heads warpgroup 0
        loads, a multiple of q_rows as TMA into the tiled tile needs; the group's first row
        among them; the group's first head)."""
        head0 = it.kv_head * (self.num_heads // self.num_kv_heads)
        first = lax.rem(head0, self.q_rows)
        return head0 - first, first, head0

    def steps(self, it: Item) -> jax.Array:
        """Key blocks the memory warpgroup fetches for an item (the longer warpgroup's)."""
        return jnp.maximum(self.warpgroup(it, 0)[3], self.warpgroup(it, 1)[3])


def ragged_paged_attention(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    query_start: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    config: MgpuConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal ragged paged attention on Mosaic GPU; the arguments as in
    `reference.ragged_paged_attention_reference`: q [T, N, H], kv_cache [2, K, P, S, H],
    kv_lens [R], page_indices [R, maxP], query_start [R + 1], num_seqs [1]. Returns [T, N, H].
    interpret: run in Mosaic GPU's interpreter on the CPU (jax 0.11; tests). There, P @ V is
    a jnp dot added to the accumulator instead of a wgmma into the carried accumulator
    (`pl.run_state`, which the interpreter cannot run); the rest is the GPU's kernel.
    """
    cfg = config or MgpuConfig()
    # TMA views q as 8-row tiles: pad the rows (copies q).
    num_tokens = q.shape[0] + -q.shape[0] % _ROW_ALIGN
    # A tile's q load may run past the last row, where TMA reads zeros; Mosaic GPU's
    # interpreter refuses such reads, so there the buffer gets a tile's rows more.
    rows = num_tokens + (_COMPUTE_WGS * cfg.block_q if interpret else 0)
    padded = jnp.pad(q, ((0, rows - q.shape[0]), (0, 0), (0, 0))) if rows > q.shape[0] else q
    args = (padded, kv_cache, kv_lens, page_indices, query_start, num_seqs)
    out = _attention(*args, num_tokens=num_tokens, sm_scale=sm_scale, cfg=cfg, interpret=interpret)
    return out[: q.shape[0]]


def _attention(
    q,
    kv_cache,
    kv_lens,
    page_indices,
    query_start,
    num_seqs,
    *,
    num_tokens: int,
    sm_scale: float,
    cfg: MgpuConfig,
    interpret: bool,
) -> jax.Array:
    """`ragged_paged_attention` of the first `num_tokens` rows of q (a multiple of 8)."""
    _, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_cache.shape
    if not supports(
        q.dtype,
        kv_cache.dtype,
        head_dim,
        page_size,
        None,
        None,
        cfg,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
    ):
        raise NotImplementedError(
            f"mgpu attention: dtype {q.dtype}/{kv_cache.dtype}, head_dim {head_dim}, "
            f"page size {page_size}, heads {num_heads}/{num_kv_heads}"
        )
    group = num_heads // num_kv_heads
    block_q, block_kv, steps_in_flight = cfg.block_q, cfg.block_kv, cfg.max_concurrent_steps
    pages_per_step = block_kv // page_size
    max_pages = page_indices.shape[1]
    dtype = q.dtype
    tiles, decodes, counts = work_lists(
        query_start,
        kv_lens,
        num_seqs,
        num_tokens=num_tokens,
        rows=_COMPUTE_WGS * block_q,
        block_kv=block_kv,
    )
    num_ctas = cfg.num_ctas or num_sms()
    num_ctas = max(2, num_ctas - num_ctas % 2)  # the interleave pairs CTAs (WorkItems)
    # One fresh int32 buffer: Mosaic GPU wants its operands 256-byte aligned, and the engine's
    # page table is a slice of a packed input.
    tiles_at = counts.size
    decodes_at = tiles_at + tiles.size
    pages_at = decodes_at + decodes.size
    meta = jnp.concatenate(
        [counts, tiles.reshape(-1), decodes.reshape(-1), page_indices.astype(jnp.int32).reshape(-1)]
    )
    scale_log2 = sm_scale * _LOG2E

    items = WorkItems(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        block_q=block_q,
        block_kv=block_kv,
        num_ctas=num_ctas,
        tiles_at=tiles_at,
        decodes_at=decodes_at,
    )

    # Register layouts guide the compiler only; jax 0.10's interpreter has no rule for them.
    if interpret:
        layout_cast = lambda x, _: x  # noqa: E731
        iota = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)  # noqa: E731
    else:
        layout_cast = plgpu.layout_cast
        iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, layout=plgpu.Layout.WGMMA)

    def kernel(q_ref, kv_ref, meta_ref, out_ref, scoped):
        smem, (k_ready, v_ready, q_ready), (k_free, v_free), schedule = scoped
        q_smem2, o_smem2, k_smem, v_smem = smem
        cta = lax.axis_index("ctas")
        wg = lax.axis_index("wg")
        my_items = items.num_items_of(meta_ref, cta)

        def schedule_barrier():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        @pl.when(wg < _COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]

            def item_at(i):
                it = items.item(meta_ref, cta + i * num_ctas)
                return it, items.warpgroup(it, wg)

            def load_q(it, base):
                """Start the TMA copy of an item's q rows (none for warpgroup 1 of a decode)."""

                @pl.when(~it.is_decode)
                def _():
                    plgpu.copy_gmem_to_smem(
                        q_ref.at[pl.ds(base, block_q), it.q_head], q_smem, q_ready.at[wg]
                    )

                # A decode: its group's heads and those around it, as the first rows.
                load_head, _, _ = items.decode_heads(it)
                q_rows = items.q_rows

                @pl.when(it.is_decode & (wg == 0))
                def _():
                    plgpu.copy_gmem_to_smem(
                        q_ref.at[base, pl.ds(load_head, q_rows)],
                        q_smem.at[pl.ds(0, q_rows)],
                        q_ready.at[wg],
                    )

            @pl.when(my_items > 0)
            def _():
                it, parts = item_at(0)
                load_q(it, parts[0])

            def item(i, g):
                """Item `cta + i * num_ctas`, its q already on the way; g: key blocks this CTA
                fetched before it."""
                it, (base, lo, hi, steps, first_pos, row_step) = item_at(i)
                is_dec, q_head = it.is_decode, it.q_head
                tile_steps = items.steps(it)
                # Key blocks wholly at or before this warpgroup's first position need no mask.
                full_steps = jnp.clip((first_pos + 1) // block_kv, 0, steps)
                slot_of = lambda step: lax.rem(g + step, steps_in_flight)
                _, first, head0 = items.decode_heads(it)

                @pl.when(~is_dec | (wg == 0))
                def _():
                    plgpu.barrier_wait(q_ready.at[wg])

                m_i = layout_cast(
                    jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
                )
                l_i = layout_cast(
                    jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
                )
                acc = layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

                @pl.when(steps > 0)
                def _():
                    plgpu.barrier_wait(k_ready.at[slot_of(0)])

                pl.when(wg == 1)(schedule_barrier)

                def kv_step(step, carry, masked: bool):
                    acc, m_i, l_i = carry
                    slot = slot_of(step)

                    def qk_scope(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        schedule_barrier()
                        return acc_ref[...]

                    s = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    if masked:
                        row = iota((block_q, block_kv), 0)
                        col = iota((block_q, block_kv), 1)
                        pos = row * row_step + first_pos
                        s = jnp.where(pos >= col + step * block_kv, s, -jnp.inf)
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

                    def wait_next_keys():
                        @pl.when(step + 1 < steps)
                        def _():
                            plgpu.barrier_wait(k_ready.at[slot_of(step + 1)])

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_keys()

                    if interpret:  # no `run_state` there (see the docstring)
                        acc = acc + jnp.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
                        wait_next_keys()
                    else:
                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l_i

                def drain(step, _):
                    # Blocks only the other warpgroup needs: wait for them as it does (every
                    # thread's barrier phases must stay in step across items), release the
                    # slots, keep the schedule.
                    slot = slot_of(step)
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_arrive(k_free.at[slot])
                    schedule_barrier()
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
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

                # The next item's q loads while this one's output is stored.
                @pl.when(i + 1 < my_items)
                def _():
                    nxt, parts = item_at(i + 1)
                    load_q(nxt, parts[0])

                # Rows that saw no key (the padding pseudo-request) are written as zeros.
                inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
                acc *= lax.broadcast_in_dim(inv, acc.shape, [0])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores
                o_smem[...] = acc.astype(dtype)
                plgpu.commit_smem()

                @pl.when(~is_dec)
                def _():
                    # Store exactly rows [lo, hi): one TMA copy per set bit of the count.
                    rows, start, size = hi - lo, lo, block_q
                    while size:

                        @pl.when((rows & size) != 0)
                        def _(n=size, start=start):
                            plgpu.copy_smem_to_gmem(
                                o_smem.at[pl.ds(start, n)],
                                out_ref.at[pl.ds(base + start, n), q_head],
                            )

                        start = start + (rows & size)
                        size //= 2

                @pl.when(is_dec & (wg == 0))
                def _():
                    plgpu.copy_smem_to_gmem(
                        o_smem.at[pl.ds(first, group)], out_ref.at[base, pl.ds(head0, group)]
                    )

                return g + tile_steps

            lax.fori_loop(0, my_items, item, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def item(i, g):
                it = items.item(meta_ref, cta + i * num_ctas)
                req, kv_head, tile_steps = it.req, it.kv_head, items.steps(it)

                @pl.loop(0, tile_steps)
                def _(step):
                    slot = lax.rem(g + step, steps_in_flight)

                    @pl.when(g + step >= steps_in_flight)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])
                        plgpu.barrier_wait(v_free.at[slot])

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

                return g + tile_steps

            fetched = lax.fori_loop(0, my_items, item, jnp.int32(0))

            # Observe each slot's last release too: on the GPU this only waits for the compute
            # warpgroups' last steps, which the CTA waits for anyway; Mosaic GPU's interpreter
            # checks that every warpgroup saw every phase of the barriers it waits on.
            @pl.loop(0, jnp.minimum(fetched, steps_in_flight))
            def _(slot):
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

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
        grid=(num_ctas,),
        grid_names=("ctas",),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        # Lane semantics: jax 0.10's default; 0.11 defaults to warpgroup semantics, whose layout
        # inference rejects the row-ladder stores (dynamic row offsets in shared memory).
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane
        ),
        interpret=interpret_params() if interpret else None,
    )(q, kv_cache, meta)
