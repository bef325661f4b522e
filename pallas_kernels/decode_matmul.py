"""When a decoder layer runs its matmuls fused with their neighbours (gpu_decode_matmul.py):
`PAGEJAX_GPU_DECODE_MATMUL=pallas` asks for it, for steps of at most `MAX_TOKENS` tokens (the
decode buckets) on an NVIDIA GPU with the Pallas backend, or in Pallas' interpreter with the
`pallas-interpret-gpu` backend (tests). The default, `xla`, leaves the layer to XLA: the kernel
has not been measured against XLA's fusions on a GPU yet (scripts/bench_decode_matmul.py).

A fused layer is four kernels besides the attention's:
  qkv = rmsnorm(x) @ W_qkv;  x = attn @ W_o + x;  h = silu * up of rmsnorm(x) @ W_gate_up;
  x = h @ W_down + x.
Layers with biases, q/k norms or a plain (not interleaved) gate/up weight stay with XLA.
"""

from __future__ import annotations

import os

import jax

from pallas_kernels import gate_up, hardware
from pallas_kernels.attention import AttentionBackend

MAX_TOKENS = 64  # decode buckets (16-64 tokens); from 128 tokens cuBLAS takes the matmuls


def choice() -> str:
    value = os.environ.get("PAGEJAX_GPU_DECODE_MATMUL", "xla")
    if value not in ("xla", "pallas"):
        raise ValueError(f"PAGEJAX_GPU_DECODE_MATMUL must be xla or pallas, got {value!r}")
    return value


def config_for(k: int, n: int, gate_up_block: int | None = None):
    """Tiles for x [M, K] @ w [K, N]: the largest K step of 256 or fewer rows that divides K,
    32 columns a program (16 where 32 does not divide N); None where none fits."""
    from pallas_kernels.gpu_decode_matmul import DecodeMatmulConfig

    block_k = next((b for b in (256, 128, 64, 32, 16) if k % b == 0), None)
    block_n = next((b for b in (32, 16) if n % b == 0), None)
    if block_k is None or (block_n is None and not gate_up_block):
        return None
    return DecodeMatmulConfig(block_n=block_n or 32, block_k=block_k)


def layer_mode(backend: AttentionBackend, num_tokens: int, shapes) -> str | None:
    """ "gpu", "interpret" or None (XLA) for a layer of this step size. `shapes`: the layer's
    four (K, N, gate_up_block) matmuls, or None when the layer cannot be fused."""
    if shapes is None or num_tokens > MAX_TOKENS or num_tokens % 16 or choice() != "pallas":
        return None
    if backend is AttentionBackend.PALLAS_INTERPRET_GPU:
        mode = "interpret"
    elif backend is AttentionBackend.PALLAS and hardware.is_nvidia():
        mode = "gpu"
    else:
        return None
    return mode if all(config_for(*s) is not None for s in shapes) else None


def layer_shapes(cfg) -> tuple | None:
    """The four matmuls of a decoder layer of `cfg` (a `ModelConfig`), or None when it has
    what the fused kernels do not take: biases, q/k norms, a plain gate/up layout."""
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
    norm_weight=None,
    eps: float = 1e-6,
    residual=None,
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
        config=config_for(x.shape[1], w.shape[1], gate_up_block),
        interpret=mode == "interpret",
    )
