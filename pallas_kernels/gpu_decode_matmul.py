"""A decode step's matmul with its neighbours fused: `rmsnorm(x) @ W`, `x @ W + residual`, and
`silu(gate) * up` of an interleaved gate/up weight, for the few rows (16-64 tokens) of a decode
step. Pallas with the Triton lowering, for NVIDIA GPUs; `decode_matmul_reference` is the same
computation in jnp.

Why: at 16 tokens XLA runs a Llama layer as 13 kernels. Its GEMMs split K 4-8 ways and write
float32 partials that the next fusion sums, and the RMSNorm, the residual adds and silu * up
are kernels of their own (docs/kernel_notes.md, fifteenth session). Each small kernel costs
1.5-2.3 us, ~0.42 ms of a 4.4 ms batch-1 step on an H200. Here one kernel does the work of
two or three:
- Grid: one program per `block_n` output columns. It streams its `[K, block_n]` slab of W
  `block_k` rows at a time (Triton's software pipeline keeps `num_stages` slabs in flight) and
  multiplies the whole `[M, K]` x by it, so no split of K and no partials: with 16-64 rows
  the weights are the HBM traffic. Llama-3-8B's matmuls make 128-224 programs (o_proj and
  down_proj one wave of 128 on 132 SMs). Each program reads all of x from L2, M / block_n
  times its W bytes: at 64 rows and 32 columns twice, which may bind before HBM does; the
  sweep (scripts/bench_decode_matmul.py) decides the tiles.
- RMSNorm as a prologue: every program reads all of x anyway, so it also sums x^2 over K and
  scales its accumulator's rows by `rsqrt(mean + eps)` at the end; the norm's weight scales x
  as it is loaded. (HF rounds the normalised x to the model's dtype before the weight and the
  matmul; here the scale applies in float32 after it: the same within the dtype's rounding.)
- Epilogues: `+ residual` (the o_proj and down_proj residual adds), or silu(gate) * up for the
  MLP's gate/up weight stored interleaved (gate_up.py): a program's `2 * block` columns hold
  the gate and up columns of `block` features, so it writes `block` columns of [M, F].

Opt-in and not yet measured on a GPU: `PAGEJAX_GPU_DECODE_MATMUL=pallas` makes the decoder
layers of decode-sized steps use it (decode_matmul.py, models/llama.py);
`scripts/bench_decode_matmul.py` times it against XLA's fusions of the same work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gate_up import silu_gate_up_reference

_MIN_ROWS = 16  # Triton's smallest MMA tile


@dataclasses.dataclass(frozen=True)
class DecodeMatmulConfig:
    block_n: int = 32  # output columns a program (with gate/up: 2 * block, fixed by the layout)
    block_k: int = 256  # rows of W a pipeline step
    num_warps: int = 4
    num_stages: int = 4


def supports(m: int, k: int, n: int, cfg: DecodeMatmulConfig, gate_up_block: int | None) -> bool:
    """Whole tiles only: M a power of two from 16 (Triton's tiles; the engine's decode
    buckets), K a multiple of `block_k`, N of the program's columns."""
    block_n = 2 * gate_up_block if gate_up_block else cfg.block_n
    pow2 = m >= _MIN_ROWS and m & (m - 1) == 0
    return pow2 and k % cfg.block_k == 0 and n % block_n == 0


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


def _kernel(
    *refs, cfg: DecodeMatmulConfig, block_n: int, eps: float, norm: bool, res: bool, gate_up: bool
) -> None:
    x_ref, w_ref, *rest = refs
    nw_ref = rest.pop(0) if norm else None
    res_ref = rest.pop(0) if res else None
    (o_ref,) = rest
    m, k = x_ref.shape
    bk = cfg.block_k
    col0 = pl.program_id(0) * block_n
    # With the gate/up epilogue the program's columns are `block` gate then `block` up ones:
    # two slabs and two accumulators (a register tile cannot be sliced in Triton).
    parts = 2 if gate_up else 1
    width = block_n // parts

    def body(i, carry):
        *accs, sq = carry
        x = x_ref[:, pl.ds(i * bk, bk)]  # [M, bk]
        if norm:
            x32 = x.astype(jnp.float32)
            sq = sq + jnp.sum(x32 * x32, axis=1)
            x = (x32 * nw_ref[pl.ds(i * bk, bk)].astype(jnp.float32)[None, :]).astype(x.dtype)
        for p in range(parts):
            wt = w_ref[pl.ds(i * bk, bk), pl.ds(col0 + p * width, width)]  # [bk, width]
            accs[p] = accs[p] + jax.lax.dot_general(
                x, wt, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
        return (*accs, sq)

    init = (*[jnp.zeros((m, width), jnp.float32)] * parts, jnp.zeros((m,), jnp.float32))
    *accs, sq = jax.lax.fori_loop(0, k // bk, body, init)
    if norm:
        scale = jax.lax.rsqrt(sq / k + eps)[:, None]
        accs = [acc * scale for acc in accs]
    if gate_up:
        gate, up = accs
        o_ref[:, pl.ds(pl.program_id(0) * width, width)] = (
            gate / (1.0 + jnp.exp(-gate)) * up
        ).astype(o_ref.dtype)
        return
    (acc,) = accs
    if res:
        acc = acc + res_ref[:, pl.ds(col0, block_n)].astype(jnp.float32)
    o_ref[:, pl.ds(col0, block_n)] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "gate_up_block", "config", "interpret"))
def decode_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    norm_weight: jax.Array | None = None,
    eps: float = 1e-6,
    residual: jax.Array | None = None,
    gate_up_block: int | None = None,
    config: DecodeMatmulConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] @ w [K, N] in x's dtype, with `norm_weight` [K]: rmsnorm(x) first; with
    `residual` [M, N]: added; with `gate_up_block`: w is an interleaved gate/up weight and the
    result silu(gate) * up [M, N / 2] (no residual then). Same contract as
    `decode_matmul_reference`."""
    cfg = config or DecodeMatmulConfig()
    (m, k), (_, n) = x.shape, w.shape
    if gate_up_block and residual is not None:
        raise ValueError("decode_matmul: a residual with the gate/up epilogue")
    if not supports(m, k, n, cfg, gate_up_block):
        raise NotImplementedError(f"decode_matmul: x {x.shape}, w {w.shape}, {cfg}")
    block_n = 2 * gate_up_block if gate_up_block else cfg.block_n
    out_n = n // 2 if gate_up_block else n
    args = [x, w]
    if norm_weight is not None:
        args.append(norm_weight)
    if residual is not None:
        args.append(residual)
    kernel = functools.partial(
        _kernel,
        cfg=cfg,
        block_n=block_n,
        eps=eps,
        norm=norm_weight is not None,
        res=residual is not None,
        gate_up=bool(gate_up_block),
    )
    return pl.pallas_call(
        kernel,
        grid=(n // block_n,),
        out_shape=jax.ShapeDtypeStruct((m, out_n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="decode_matmul",
    )(*args)
