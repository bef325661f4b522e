"""A decode step's matmul with its neighbours fused, for the few rows (16-64 tokens) of a
decode step: `rmsnorm(h) @ W`, `x @ W + residual`, `silu(gate) * up` of an interleaved
gate/up weight, and RoPE with the KV cache write after the q/k/v projection. Pallas with
the Triton lowering, for NVIDIA GPUs; `decode_matmul_reference` and `qkv_reference` are the
same computations in jnp.

Why: at 16 tokens XLA runs a Llama layer as 13-14 kernels. Its GEMMs split K 4-8 ways and write
float32 partials that the next fusion sums, and the RMSNorms, the residual adds and silu * up
are kernels of their own (docs/kernel_notes.md, fifteenth session). Each small kernel costs
1.5-2.3 us, ~0.42 ms of a 4.4 ms batch-1 step on an H200. Here the matmuls take their
neighbours' work into their prologue and epilogue:
- Grid: one program per `block_n` columns of W. It streams its `[K, block_n]` slab `block_k`
  rows at a time (Triton's software pipeline keeps `num_stages` slabs in flight) and multiplies
  the whole `[M, K]` x by it: no split of K, no partials. x is loaded as it is, straight into
  the MMA's operand: any arithmetic on it inside the loop (an RMSNorm prologue) made the
  kernel 2-3x slower on an H200 (sixteenth session).
- The RMSNorm is split between two kernels instead. `rmsnorm(h) @ W` equals
  `rsqrt(mean(h^2) + eps) * ((h * norm_weight) @ W)` by rows. The kernel that produces h by a
  residual add (`next_norm_weight`; in the model, o_proj's) also writes `h * norm_weight` of
  the next norm and each program's sum of h^2 over its columns (`[N / block_n, M]` float32);
  the kernel that consumes them (`row_sq`) sums those partials and scales its accumulator's
  rows at the end. Where XLA makes h (the embeddings, down_proj), `norm_inputs` makes the
  pair in jnp. (HF rounds the
  normalised h to the model's dtype before the weight; here the scale applies in float32
  after the matmul: the same within the dtype's rounding.)
- Epilogues: `+ residual`, or silu(gate) * up for the MLP's gate/up weight stored interleaved
  (gate_up.py): a program's columns are `block_n / 2` gate ones and the up ones that pair with
  them, and it writes `block_n / 2` columns of [M, F].
- The attention's epilogue (`qkv`): for the fused q/k/v weight, whose q and k heads the model
  keeps with RoPE's rotated pairs side by side (rope.py), a program's columns lie in one head
  and hold whole pairs. It applies RoPE to q and k, writes q out, and stores k and v straight
  into the paged KV cache at the tokens' slots (aliased in place). That took two small XLA
  kernels (the cache scatter, and a fusion of RoPE's), ~3.5 us a layer with their gaps on an
  H200 (seventeenth session). The rows' cos and sin come in as [M, H / 2] tables, computed
  once a step (XLA merges the layers' identical computations into one fusion): computed in
  each program's epilogue they made qkv 2.5 us a layer slower at 64 rows on an H100, the
  64-row forward ~2 % slower (twenty-second session).

Decoder layers of decode-sized steps use it for qkv, o_proj and gate/up (decode_matmul.py,
models/llama.py; `PAGEJAX_GPU_DECODE_MATMUL=xla` opts out); `scripts/bench_decode_matmul.py`
times it against XLA's fusions of the same work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gate_up import silu_gate_up_reference
from pallas_kernels.reference import write_kv_reference
from pallas_kernels.rope import apply_rope, rope_cos_sin

_MIN_ROWS = 16  # Triton's smallest MMA tile


@dataclasses.dataclass(frozen=True)
class DecodeMatmulConfig:
    block_n: int = 32  # W columns a program (gate/up: half gate, half up, within one block;
    # qkv: within one head)
    block_k: int = 256  # rows of W a pipeline step
    num_warps: int = 4
    num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class QkvHeads:
    """The attention epilogue's static shape: a q/k/v weight's heads (N q, K kv) of `head_dim`."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(
    m: int,
    k: int,
    n: int,
    cfg: DecodeMatmulConfig,
    gate_up_block: int | None,
    qkv: QkvHeads | None = None,
) -> bool:
    """Whole tiles only: M a power of two from 16 (Triton's tiles; the engine's decode
    buckets), K a multiple of `block_k`, N of the program's columns; with gate/up, half the
    program's columns divide the gate/up block; with the attention's epilogue, the program's
    columns divide a head (whole RoPE pairs of one head)."""
    pow2 = m >= _MIN_ROWS and _pow2(m)
    whole = k % cfg.block_k == 0 and n % cfg.block_n == 0
    if gate_up_block:
        whole = whole and cfg.block_n % 2 == 0 and gate_up_block % (cfg.block_n // 2) == 0
    if qkv:  # whole RoPE pairs of one head
        whole = whole and n == qkv.width and qkv.head_dim % cfg.block_n == 0
        whole = whole and cfg.block_n % 2 == 0
    return pow2 and whole


def decode_matmul_reference(
    x: jax.Array,
    w: jax.Array,
    *,
    norm_weight: jax.Array | None = None,
    eps: float = 1e-6,
    residual: jax.Array | None = None,
    gate_up_block: int | None = None,
) -> jax.Array:
    """The model's own order (models/llama.py): RMSNorm in float32, cast, scaled; the matmul
    in x's dtype; silu * up (interleaved columns) or `+ residual`."""
    if norm_weight is not None:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        x = x32.astype(x.dtype) * norm_weight
    y = x @ w
    if gate_up_block:
        y = silu_gate_up_reference(y, gate_up_block)
    if residual is not None:
        y = y + residual
    return y


def qkv_reference(
    qkv: jax.Array,
    heads: QkvHeads,
    positions: jax.Array,
    inv_freq: jax.Array,
    kv_cache: jax.Array,
    slot_ids: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The attention's epilogue on a q/k/v projection [T, (N + 2K) H] (the model's order: RoPE
    on q and k, then the cache write of reference.py): (q [T, N H], the updated cache)."""
    t, (n, k, h) = qkv.shape[0], (heads.num_heads, heads.num_kv_heads, heads.head_dim)
    q, kk, v = jnp.split(qkv, [n * h, (n + k) * h], axis=-1)
    q = apply_rope(q.reshape(t, n, h), positions, inv_freq)
    kk = apply_rope(kk.reshape(t, k, h), positions, inv_freq)
    kv_cache = write_kv_reference(kv_cache, kk, v.reshape(t, k, h), slot_ids)
    return q.reshape(t, n * h), kv_cache


def norm_inputs(h: jax.Array, norm_weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What `decode_matmul(x, w, row_sq=...)` takes for `rmsnorm(h) @ w`: `h * norm_weight` in
    h's dtype and the rows' sums of h^2, as one partial ([1, M] float32)."""
    h32 = h.astype(jnp.float32)
    return (h32 * norm_weight.astype(jnp.float32)).astype(h.dtype), jnp.sum(h32 * h32, 1)[None]


def _kernel(
    *refs,
    cfg: DecodeMatmulConfig,
    eps: float,
    scale_rows: bool,
    res: bool,
    next_norm: bool,
    gate_up: int | None,
    qkv: QkvHeads | None,
    page_size: int,
) -> None:
    x_ref, w_ref, *rest = refs
    sq_in_ref = rest.pop(0) if scale_rows else None
    res_ref = rest.pop(0) if res else None
    nw_ref = rest.pop(0) if next_norm else None
    rope_refs = [rest.pop(0) for _ in range(4)] if qkv else None  # cos, sin, slots, kv
    o_ref, *next_refs = rest
    m, k = x_ref.shape
    bk, block_n, pid = cfg.block_k, cfg.block_n, pl.program_id(0)
    # With the gate/up epilogue the program's columns are `width` gate ones and the `width` up
    # ones that pair with them, `gate_up` (the layout's block) apart: two slabs and two
    # accumulators (a Triton register tile splits only in halves of its last axis, and these
    # slabs are a block apart).
    parts = 2 if gate_up else 1
    width = block_n // parts
    if gate_up:  # block b of the layout holds gate then up columns of its `gate_up` features
        per_block = gate_up // width
        col0 = (pid // per_block) * 2 * gate_up + (pid % per_block) * width
        offsets = (col0, col0 + gate_up)
    else:
        col0 = pid * block_n
        offsets = (col0,)

    def body(i, accs):
        x = x_ref[:, pl.ds(i * bk, bk)]  # [M, bk], as loaded: no arithmetic before the MMA
        return tuple(
            acc
            + jax.lax.dot_general(
                x,
                w_ref[pl.ds(i * bk, bk), pl.ds(offset, width)],  # [bk, width]
                (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            for acc, offset in zip(accs, offsets, strict=True)
        )

    accs = jax.lax.fori_loop(0, k // bk, body, (jnp.zeros((m, width), jnp.float32),) * parts)
    if scale_rows:  # the RMSNorm's scale, from the producer's partial sums of h^2
        mean_sq = jnp.sum(sq_in_ref[...], axis=0) / k
        accs = [acc * jax.lax.rsqrt(mean_sq + eps)[:, None] for acc in accs]
    if qkv:
        _qkv_epilogue(accs[0], col0, (*rope_refs[:3], o_ref, *next_refs), qkv, page_size)
        return
    if gate_up:
        gate, up = accs
        o_ref[:, pl.ds(pid * width, width)] = (gate / (1.0 + jnp.exp(-gate)) * up).astype(
            o_ref.dtype
        )
        return
    (acc,) = accs
    if res:
        acc = acc + res_ref[:, pl.ds(col0, block_n)].astype(jnp.float32)
    y = acc.astype(o_ref.dtype)
    o_ref[:, pl.ds(col0, block_n)] = y
    if next_norm:  # the next RMSNorm's inputs (norm_inputs), from the rounded output
        hw_ref, sq_ref = next_refs
        y32 = y.astype(jnp.float32)
        nw = nw_ref[pl.ds(col0, block_n)].astype(jnp.float32)
        hw_ref[:, pl.ds(col0, block_n)] = (y32 * nw[None, :]).astype(hw_ref.dtype)
        sq_ref[pl.ds(pid, 1), :] = jnp.sum(y32 * y32, axis=1)[None, :]


def _qkv_epilogue(acc, col0, refs, qkv: QkvHeads, page_size: int) -> None:
    """Columns `col0 + [0, block_n)` of the q/k/v projection (q's heads, then k's, then v's),
    within one head, RoPE's pairs interleaved: RoPE on q and k, q to its output, k and v into
    the cache at the rows' slots (rows in page 0, the padding tokens', are not written)."""
    cos_ref, sin_ref, slot_ref, q_ref, cache_ref = refs
    n, kv_heads, h = qkv.num_heads, qkv.num_kv_heads, qkv.head_dim
    m, block_n = acc.shape
    head, col = col0 // h, col0 % h
    # The layer rounds its projection to the model's dtype before RoPE (models/llama.py).
    y = acc.astype(q_ref.dtype).astype(jnp.float32)
    x1, x2 = jnp.unstack(y.reshape(m, block_n // 2, 2), axis=-1)  # [M, block_n / 2] each
    cos = cos_ref[:, pl.ds(col // 2, block_n // 2)]
    sin = sin_ref[:, pl.ds(col // 2, block_n // 2)]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(m, block_n)
    is_v = head >= n + kv_heads  # v is not rotated
    y = jnp.where(is_v, y, rotated)

    @pl.when(head < n)
    def _():
        q_ref[:, pl.ds(col0, block_n)] = y.astype(q_ref.dtype)

    @pl.when(head >= n)
    def _():
        kv = is_v.astype(jnp.int32)  # the cache's K (0) or V (1) half
        slots = slot_ref[...][:, None]  # [M, 1]
        cols = (col + jnp.arange(block_n))[None, :]
        # Every index an array (a scatter), which Pallas' interpreter needs.
        plgpu.store(
            cache_ref.at[kv, head - n - kv * kv_heads, slots, cols],
            y.astype(cache_ref.dtype),
            mask=jnp.broadcast_to(slots >= page_size, y.shape),
        )


def _qkv_operands(
    qkv: QkvHeads,
    m: int,
    dtype,
    positions: jax.Array,
    inv_freq: jax.Array,
    kv_cache: jax.Array,
    slot_ids: jax.Array,
) -> tuple[list[jax.Array], list[jax.ShapeDtypeStruct]]:
    """The attention epilogue's operands (RoPE's cos and sin of each row's angles [M, H / 2],
    slots, the cache viewed as `[2, K, pages * S, H]`) and the call's outputs (q, that cache
    view), checked against `qkv`: a mismatched cache or table would make the kernel store out
    of bounds. The angles' cos and sin are computed here, not in the epilogue, where each
    program ran libdevice's sin and cos on its [M, block_n / 2] angles after its loop, with
    nothing to hide them; the layers' calls share this computation (XLA merges identical
    ones: one fusion a step)."""
    two, kv_heads, num_pages, page_size, head_dim = kv_cache.shape
    if (two, kv_heads, head_dim) != (2, qkv.num_kv_heads, qkv.head_dim):
        raise ValueError(f"decode_matmul: a cache of shape {kv_cache.shape} for {qkv}")
    if positions.shape != (m,) or slot_ids.shape != (m,) or inv_freq.shape != (head_dim // 2,):
        raise ValueError(
            f"decode_matmul: positions {positions.shape}, slot_ids {slot_ids.shape}, inv_freq "
            f"{inv_freq.shape} for {m} rows and heads of {head_dim}"
        )
    flat = kv_cache.reshape(2, kv_heads, num_pages * page_size, head_dim)  # a bitcast
    operands = [*rope_cos_sin(positions, inv_freq), slot_ids.astype(jnp.int32), flat]
    out_shape = [
        jax.ShapeDtypeStruct((m, qkv.num_heads * qkv.head_dim), dtype),
        jax.ShapeDtypeStruct(flat.shape, flat.dtype),
    ]
    return operands, out_shape


@functools.partial(jax.jit, static_argnames=("eps", "gate_up_block", "qkv", "config", "interpret"))
def decode_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    row_sq: jax.Array | None = None,
    eps: float = 1e-6,
    residual: jax.Array | None = None,
    next_norm_weight: jax.Array | None = None,
    gate_up_block: int | None = None,
    qkv: QkvHeads | None = None,
    positions: jax.Array | None = None,
    inv_freq: jax.Array | None = None,
    kv_cache: jax.Array | None = None,
    slot_ids: jax.Array | None = None,
    config: DecodeMatmulConfig | None = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, ...]:
    """x [M, K] @ w [K, N] in x's dtype.
    - `row_sq` [P, M] float32: the result's rows scaled by `rsqrt(sum(row_sq, 0) / K + eps)`;
      with x and row_sq from `norm_inputs(h, norm_weight)` that is `rmsnorm(h) @ w`.
    - `residual` [M, N]: added. With `next_norm_weight` [N] too, the result y comes with the
      next matmul's inputs: `(y, y * next_norm_weight, sums of y^2 [N / block_n, M])`.
    - `gate_up_block`: w is an interleaved gate/up weight and the result silu(gate) * up
      [M, N / 2] (no residual then).
    - `qkv`: w is the attention's q/k/v weight (q and k heads with RoPE's pairs interleaved);
      with `positions` [M] int32, `inv_freq` [H / 2]
      float32, `kv_cache` [2, K, pages, S, H] and `slot_ids` [M] int32 the result is
      `(q after RoPE [M, N H], the cache with this step's k (after RoPE) and v written)`,
      the cache updated in place where the caller donates it (`qkv_reference`).
    `decode_matmul_reference` computes the same."""
    cfg = config or DecodeMatmulConfig()
    (m, k), (_, n) = x.shape, w.shape
    rope_args = (positions, inv_freq, kv_cache, slot_ids)
    if gate_up_block and residual is not None:
        raise ValueError("decode_matmul: a residual with the gate/up epilogue")
    if next_norm_weight is not None and residual is None:
        raise ValueError("decode_matmul: next_norm_weight comes with a residual add")
    if qkv and (gate_up_block or residual is not None or any(a is None for a in rope_args)):
        raise ValueError("decode_matmul: qkv takes positions, inv_freq, kv_cache and slot_ids")
    if not supports(m, k, n, cfg, gate_up_block, qkv):
        raise NotImplementedError(f"decode_matmul: x {x.shape}, w {w.shape}, {cfg}, {qkv}")
    if row_sq is not None and not _pow2(row_sq.shape[0]):  # a Triton tile: the partials
        raise NotImplementedError(f"decode_matmul: {row_sq.shape[0]} partial sums of squares")
    out_shape = [jax.ShapeDtypeStruct((m, n // 2 if gate_up_block else n), x.dtype)]
    if next_norm_weight is not None:
        out_shape += [
            jax.ShapeDtypeStruct((m, n), x.dtype),
            jax.ShapeDtypeStruct((n // cfg.block_n, m), jnp.float32),
        ]
    args = [x, w] + [a for a in (row_sq, residual, next_norm_weight) if a is not None]
    aliases, page_size = {}, 0
    if qkv:  # q out, and the cache aliased in place (the last operand)
        operands, out_shape = _qkv_operands(qkv, m, x.dtype, *rope_args)
        aliases, page_size = {len(args) + len(operands) - 1: 1}, kv_cache.shape[3]
        args += operands
    kernel = functools.partial(
        _kernel,
        cfg=cfg,
        eps=eps,
        scale_rows=row_sq is not None,
        res=residual is not None,
        next_norm=next_norm_weight is not None,
        gate_up=gate_up_block,
        qkv=qkv,
        page_size=page_size,
    )
    out = pl.pallas_call(
        kernel,
        grid=(n // cfg.block_n,),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="decode_matmul",
    )(*args)
    if qkv:
        return out[0], out[1].reshape(kv_cache.shape)
    return tuple(out) if next_norm_weight is not None else out[0]
