"""When a decoder layer runs its matmuls fused with their neighbours (gpu_decode_matmul.py):
`PAGEJAX_GPU_DECODE_MATMUL=pallas` asks for it, for steps of 16, 32 or 64 tokens (the decode
buckets) on an NVIDIA GPU with the Pallas backend, or in Pallas' interpreter with the
`pallas-interpret-gpu` backend (tests). The default, `xla`, leaves the layer to XLA: the kernel
has not been measured against XLA's fusions on a GPU yet (scripts/bench_decode_matmul.py).

A fused layer is four kernels besides the attention's:
  qkv = rmsnorm(x) @ W_qkv;  x = attn @ W_o + x;  h = silu * up of rmsnorm(x) @ W_gate_up;
  x = h @ W_down + x.
Layers with biases, q/k norms, a plain (not interleaved) gate/up weight or float16 weights
stay with XLA. The variable is read when the model is built (`layer_shapes`), so it is part
of the layer's definition: two settings never share a trace.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from pallas_kernels import gate_up, hardware
from pallas_kernels.attention import AttentionBackend

ROWS = (16, 32, 64)  # decode buckets: Triton tiles are powers of two; cuBLAS from 128 tokens
# Shared memory a program's pipeline may take: num_stages x (W slab + x slab). Hopper gives a
# block 227 KiB; the rest is Triton's own scratch.
_SMEM_BUDGET = 160 * 1024
_STAGES = 4

MatmulShape = tuple[int, int, int | None]  # K, N, gate/up block (None: a plain matmul)


def choice() -> str:
    value = os.environ.get("PAGEJAX_GPU_DECODE_MATMUL", "xla")
    if value not in ("xla", "pallas"):
        raise ValueError(f"PAGEJAX_GPU_DECODE_MATMUL must be xla or pallas, got {value!r}")
    return value


def config_for(m: int, k: int, n: int, gate_up_block: int | None = None):
    """Tiles for x [M, K] @ w [K, N] (a `DecodeMatmulConfig`, or None where none fits): 32
    columns a program (16 where 32 does not divide N; a gate/up pair with the gate/up
    epilogue), and the largest K step of at most 256 rows that divides K and keeps
    `_STAGES` slabs of W and x within `_SMEM_BUDGET`."""
    from pallas_kernels.gpu_decode_matmul import DecodeMatmulConfig

    block_n = next((b for b in (32, 16) if n % b == 0), None)
    cols = 2 * gate_up_block if gate_up_block else block_n
    if cols is None or n % cols:
        return None
    per_row = _STAGES * (cols + m) * 2  # bytes a K row of the slabs takes, 16-bit weights
    block_k = next(
        (b for b in (256, 128, 64, 32, 16) if k % b == 0 and b * per_row <= _SMEM_BUDGET), None
    )
    if block_k is None:
        return None
    return DecodeMatmulConfig(block_n=block_n or cols, block_k=block_k, num_stages=_STAGES)


def layer_mode(
    backend: AttentionBackend, num_tokens: int, shapes: tuple[MatmulShape, ...] | None
) -> str | None:
    """ "gpu", "interpret" or None (XLA) for a layer of this step size. `shapes`: the layer's
    four matmuls (`layer_shapes`), None when the layer is not to be fused."""
    if shapes is None or num_tokens not in ROWS:
        return None
    if backend is AttentionBackend.PALLAS_INTERPRET_GPU:
        mode = "interpret"
    elif backend is AttentionBackend.PALLAS and hardware.is_nvidia():
        mode = "gpu"
    else:
        return None
    return mode if all(config_for(num_tokens, *s) is not None for s in shapes) else None


def layer_shapes(cfg, dtype) -> tuple[MatmulShape, ...] | None:
    """The four matmuls of a decoder layer of `cfg` (a `ModelConfig`), or None when the layer
    is not to be fused: `PAGEJAX_GPU_DECODE_MATMUL` is not `pallas`, or the layer has what the
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
    return ((d, (n + 2 * k) * h, None), (n * h, d, None), (d, 2 * f, block), (f, d, None))


def matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    mode: str,
    norm_weight: jax.Array | None = None,
    eps: float = 1e-6,
    residual: jax.Array | None = None,
    gate_up_block: int | None = None,
) -> jax.Array:
    """`gpu_decode_matmul.decode_matmul` with `config_for`'s tiles."""
    from pallas_kernels import gpu_decode_matmul

    return gpu_decode_matmul.decode_matmul(
        x,
        w,
        norm_weight=norm_weight,
        eps=eps,
        residual=residual,
        gate_up_block=gate_up_block,
        config=config_for(x.shape[0], x.shape[1], w.shape[1], gate_up_block),
        interpret=mode == "interpret",
    )
