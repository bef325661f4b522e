"""Rotary embeddings in the layout the models keep q and k heads in: each head's rotated pairs
side by side, (x_0, x_{H/2}, x_1, x_{H/2 + 1}, ...), where Hugging Face's rotate-half layout
puts x_i and x_{i + H/2} half a head apart.

Why: a kernel that holds any even run of a head's columns then holds whole pairs, so the
fused decode matmul can apply RoPE to its own output tile (gpu_decode_matmul.py). Attention
scores are unchanged, as q's and k's head dims are permuted alike (v is not permuted). The
loader arranges checkpoints into this layout (models/layout.arrange_param). llama.cpp's GGUF
files keep llama's q/k in the same layout (models/gguf.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gate_up import ArrayLike


def interleave_rope_pairs(x: ArrayLike, head_dim: int) -> ArrayLike:
    """[..., heads * H] in HF's rotate-half layout -> each head's pairs side by side. numpy or
    jax arrays."""
    *lead, width = x.shape
    halves = x.reshape(*lead, width // head_dim, 2, head_dim // 2)
    return halves.swapaxes(-1, -2).reshape(*lead, width)


def deinterleave_rope_pairs(x: ArrayLike, head_dim: int) -> ArrayLike:
    """The inverse of `interleave_rope_pairs`: back to HF's rotate-half layout."""
    *lead, width = x.shape
    pairs = x.reshape(*lead, width // head_dim, head_dim // 2, 2)
    return pairs.swapaxes(-1, -2).reshape(*lead, width)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of each token's angles, [T, H / 2] float32 each; the angles in float32, as
    HF computes them. `apply_rope` and the fused qkv kernel's tables
    (gpu_decode_matmul.py) both take them from here."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq.astype(jnp.float32)[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF's rotate-half RoPE on heads with their pairs side by side. x: [T, heads, H];
    positions: [T]; inv_freq: [H / 2]. The angles in float32, as HF computes them.

    As arithmetic on the whole head, `x * cos + x[j ^ 1] * (-sin, sin, ...)` (each pair's
    cos and sin repeated), not as pairs split and stacked: XLA's fusion then keeps H as its
    minor dimension. On an H200 a prefill step's q/k RoPE at 8,192 tokens took 67 us against
    116 us for the split-and-stack form (65 us in HF's rotate-half layout; eighteenth
    session)."""
    h = x.shape[-1]
    cos, sin = rope_cos_sin(positions, inv_freq)  # [T, H / 2]
    cos = jnp.repeat(cos, 2, axis=-1)[:, None, :]  # [T, 1, H]
    sin = jnp.repeat(sin, 2, axis=-1)[:, None, :]
    sign = jnp.tile(jnp.asarray([-1.0, 1.0], jnp.float32), h // 2)  # x0' = x0 c - x1 s, ...
    x32 = x.astype(jnp.float32)
    swapped = x32.reshape(*x.shape[:-1], h // 2, 2)[..., ::-1].reshape(x.shape)  # x[j ^ 1]
    return (x32 * cos + swapped * (sign * sin)).astype(x.dtype)
