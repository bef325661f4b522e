"""When a decoder layer runs its matmuls fused with their neighbours (gpu_decode_matmul.py):
steps of 16, 32 or 64 tokens (the decode buckets) of bfloat16 models on a Hopper GPU with the
Pallas backend, and in Pallas' interpreter with the `pallas-interpret-gpu` backend (tests),
unless `PAGEJAX_GPU_DECODE_MATMUL=xla` leaves every layer to XLA's fusions (the default is
`pallas`). The tiles assume Hopper's shared memory (227 KiB a block) and 16-bit weights.

A fused layer's matmuls (DecoderLayer.fused, models/llama.py):
  qkv = rmsnorm(x) @ W_qkv (RoPE, q out, k and v into the KV cache);  x = attn @ W_o + x;
  h = silu * up of rmsnorm(x) @ W_gate_up
are these kernels (qkv without its RoPE and cache write for heads of no multiple of 16).
x = h @ W_down + x stays with XLA, whose split-K GEMM streams that weight faster: 31 us against
this kernel's 34 at 16 rows on an H200, as each of the kernel's 128 programs reads all of the
[M, 14336] x. On an H200 (sixteenth session, docs/BENCHMARKS.md): a forward of 32 or 64
decodes 1.9 / 2.9 % faster, of one decode even (4.42 against 4.40 ms); batch-1 decode steps
in `bench latency` 1.7-5 % faster; TPOT p50 at rate 16 10 % lower.
Layers with biases, q/k norms, a plain (not interleaved) gate/up weight or float16 weights
stay with XLA. The variable is read when the model is built (`layer_shapes`), so it is part
of the layer's definition: two settings never share a trace.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import gate_up, gpu_decode_matmul, hardware
from pallas_kernels.attention import AttentionBackend
from pallas_kernels.gpu_decode_matmul import DecodeMatmulConfig, QkvHeads

ROWS = (16, 32, 64)  # decode buckets: Triton tiles are powers of two; cuBLAS from 128 tokens
# Shared memory a program's pipeline may take: num_stages x (W slab + x slab). Hopper gives a
# block 227 KiB; the rest is Triton's own scratch.
_SMEM_BUDGET = 160 * 1024
_MAX_STAGES = 6
_BLOCK_K = 128
_GATE_UP_BLOCK_K, _GATE_UP_STAGES = 64, 3
_MIN_PROGRAMS = 96  # wider column slabs while the grid still fills most of an H100/H200's SMs


class MatmulShape(NamedTuple):
    """One fused matmul of a layer, x [M, k] @ w [k, n], and its epilogue's static shape."""

    k: int
    n: int
    gate_up_block: int | None = None  # the gate/up epilogue's layout block
    qkv: QkvHeads | None = None  # the attention's epilogue (RoPE, the KV cache write)


def choice() -> str:
    value = os.environ.get("PAGEJAX_GPU_DECODE_MATMUL", "pallas")
    if value not in ("xla", "pallas"):
        raise ValueError(f"PAGEJAX_GPU_DECODE_MATMUL must be xla or pallas, got {value!r}")
    return value


def _columns(n: int, sizes: tuple[int, ...]) -> int | None:
    """The widest of `sizes` that divides N and leaves `_MIN_PROGRAMS` programs, or the
    narrowest that divides N (the most programs)."""
    fits = [b for b in sizes if n % b == 0]
    return next((b for b in fits if n // b >= _MIN_PROGRAMS), fits[-1] if fits else None)


def qkv_columns(heads: QkvHeads) -> int | None:
    """A program's columns with the attention's epilogue: as a plain matmul's, within one
    head (64, 32 or 16 that divide head_dim); None for a head of none of them."""
    return _columns(heads.width, tuple(c for c in (64, 32, 16) if heads.head_dim % c == 0))


def config_for(
    m: int, k: int, n: int, gate_up_block: int | None = None, qkv: QkvHeads | None = None
):
    """Tiles for x [M, K] @ w [K, N] (a `DecodeMatmulConfig`, or None where none fits).
    - A plain matmul: the widest of 64, 32, 16 columns a program that divides N and leaves
      `_MIN_PROGRAMS` programs (or 16: the most); K steps of 128 rows (or the largest power
      of two below that divides K); as many pipeline stages as fit `_SMEM_BUDGET`, up to 6.
    - With the attention's epilogue: the same, within a head (`qkv_columns`).
    - With the gate/up epilogue: a whole gate/up pair of blocks a program, K steps of 64
      rows, 3 stages: small enough that two programs share an SM, which the 224 programs of
      Llama-3-8B's gate/up need on 132 SMs.
    Measured on an H200 (sixteenth session, scripts/bench_decode_matmul.py --sweep) at 16
    and 32 rows: 64 columns, 128-row steps and 6 stages for qkv; gate/up 55.6 us at 16 rows
    against 58.1 with 128-row steps and 4 stages."""
    if gate_up_block:
        cols = 2 * gate_up_block if n % (2 * gate_up_block) == 0 else None
        steps, max_stages = (_GATE_UP_BLOCK_K, 32, 16), _GATE_UP_STAGES
    else:
        cols = qkv_columns(qkv) if qkv else _columns(n, (64, 32, 16))
        steps, max_stages = (_BLOCK_K, 64, 32, 16), _MAX_STAGES
    block_k = next((b for b in steps if k % b == 0), None)
    if cols is None or block_k is None or (qkv and n != qkv.width):
        return None
    stages = min(max_stages, _SMEM_BUDGET // (block_k * (cols + m) * 2))  # 16-bit weights
    if stages < 2:
        return None
    return DecodeMatmulConfig(block_n=cols, block_k=block_k, num_stages=stages)


def layer_mode(
    backend: AttentionBackend,
    num_tokens: int,
    shapes: tuple[MatmulShape, ...] | None,
    dtype: jnp.dtype = jnp.bfloat16,
) -> str | None:
    """ "gpu", "interpret" or None (XLA) for a layer of this step size. `shapes`: the layer's
    fused matmuls (`layer_shapes`), None when the layer is not to be fused; `dtype`: its
    weights' (the GPU's tiles are for bfloat16; the interpreter takes float32 too)."""
    if shapes is None or num_tokens not in ROWS:
        return None
    if backend is AttentionBackend.PALLAS_INTERPRET_GPU:
        mode = "interpret"
    elif backend is AttentionBackend.PALLAS and hardware.is_hopper():
        mode = "gpu"
    else:
        return None
    if mode == "gpu" and jnp.dtype(dtype) != jnp.bfloat16:
        return None
    configs = [config_for(num_tokens, *s) for s in shapes]
    if any(c is None for c in configs):
        return None
    # o_proj's residual add hands the post-attention norm its partial sums of squares, one a
    # program: gate/up loads them as one tile, so their count is a power of two.
    partials = shapes[1].n // configs[1].block_n
    return mode if partials & (partials - 1) == 0 else None


def layer_shapes(cfg, dtype) -> tuple[MatmulShape, ...] | None:
    """The fused matmuls of a decoder layer of `cfg` (a `ModelConfig`): qkv (with the
    attention's epilogue where its heads allow: `qkv_columns`), o_proj, gate/up (down_proj
    stays with XLA: `DecoderLayer.fused`), or None when the layer
    is not to be fused: `PAGEJAX_GPU_DECODE_MATMUL` is `xla`, or the layer has what the
    fused kernels do not take (biases, q/k norms, a plain gate/up layout), or float16 weights
    (the norm's weight scales x before the norm does, which float16 could overflow)."""
    if choice() != "pallas" or jnp.dtype(dtype) == jnp.float16:
        return None
    if cfg.attention_bias or cfg.mlp_bias or cfg.qk_norm:
        return None
    block = gate_up.block_for(cfg.intermediate_size)
    if block != gate_up.BLOCK:
        return None
    d, f = cfg.hidden_size, cfg.intermediate_size
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    heads = QkvHeads(n, k, h)
    return (
        MatmulShape(d, heads.width, qkv=heads if qkv_columns(heads) else None),
        MatmulShape(n * h, d),
        MatmulShape(d, 2 * f, gate_up_block=block),
    )


def norm_inputs(h: jax.Array, norm_weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`gpu_decode_matmul.norm_inputs`: the norm inputs a fused layer's qkv takes, made in
    jnp from the embeddings and from XLA's down_proj."""
    return gpu_decode_matmul.norm_inputs(h, norm_weight)


def matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    mode: str,
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
) -> jax.Array | tuple[jax.Array, ...]:
    """`gpu_decode_matmul.decode_matmul` with `config_for`'s tiles, interpreted in mode
    "interpret"."""
    return gpu_decode_matmul.decode_matmul(
        x,
        w,
        row_sq=row_sq,
        eps=eps,
        residual=residual,
        next_norm_weight=next_norm_weight,
        gate_up_block=gate_up_block,
        qkv=qkv,
        positions=positions,
        inv_freq=inv_freq,
        kv_cache=kv_cache,
        slot_ids=slot_ids,
        config=config_for(x.shape[0], x.shape[1], w.shape[1], gate_up_block, qkv),
        interpret=mode == "interpret",
    )
