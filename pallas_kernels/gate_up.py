"""The MLP's silu(x @ W_gate) * (x @ W_up), and the layout of its fused weight.

The fused gate/up weight [D, 2F] is stored *interleaved*: blocks of `block` gate columns and
`block` up columns alternate (`interleave`), with `block = block_for(F)`: `BLOCK` (64) where it
divides F, else F, which is the plain [gate | up] concatenation. Interleaved, a tile of
`2 * block` output columns holds the gate and up columns of the same `block` features, so a
matmul kernel can apply the activation in its epilogue and write only [T, F]
(gpu_gate_up.py, Hopper); every other path multiplies with XLA and applies
`silu_gate_up_reference` to the same layout.

The loader interleaves a checkpoint's gate_proj and up_proj once, as it fuses them
(models/loader.py); random (dummy) weights need no layout.
"""

from __future__ import annotations

import os
from typing import TypeVar

import jax
import numpy as np

from pallas_kernels import hardware

ArrayLike = TypeVar("ArrayLike", np.ndarray, jax.Array)

BLOCK = 64
# The fused kernel takes steps from here on. H200, Llama-3-8B MLP, against XLA's matmul and
# activation (docs/BENCHMARKS.md, ninth session): 305 against 323 us at 1,024 rows, 2,446
# against 2,525-2,621 at 8,192; below, 88 against 98 at 256 rows but 172 against 170 at 512.
GPU_KERNEL_MIN_TOKENS = 1024


def block_for(intermediate_size: int) -> int:
    """The interleaving block of an MLP of this width: BLOCK, or F (the plain layout)."""
    return BLOCK if intermediate_size % BLOCK == 0 else intermediate_size


def interleave(w: ArrayLike, block: int) -> ArrayLike:
    """[..., 2F] as [gate | up] -> gate and up blocks of `block` columns alternating. numpy or
    jax arrays."""
    *lead, two_f = w.shape
    f = two_f // 2
    return w.reshape(*lead, 2, f // block, block).swapaxes(-3, -2).reshape(*lead, two_f)


def deinterleave(w: ArrayLike, block: int) -> ArrayLike:
    """The inverse of `interleave`: back to [gate | up]."""
    *lead, two_f = w.shape
    f = two_f // 2
    return w.reshape(*lead, f // block, 2, block).swapaxes(-3, -2).reshape(*lead, two_f)


def silu_gate_up_reference(y: jax.Array, block: int) -> jax.Array:
    """silu(gate) * up of an interleaved product y = x @ W: [T, 2F] -> [T, F]."""
    *lead, two_f = y.shape
    pairs = y.reshape(*lead, two_f // (2 * block), 2, block)
    return (jax.nn.silu(pairs[..., 0, :]) * pairs[..., 1, :]).reshape(*lead, two_f // 2)


def _use_gpu_kernel(x: jax.Array, kernel: jax.Array, block: int) -> bool:
    choice = os.environ.get("PAGEJAX_GPU_GATE_UP", "auto")
    if choice not in ("auto", "xla"):
        raise ValueError(f"PAGEJAX_GPU_GATE_UP must be auto or xla, got {choice!r}")
    if choice == "xla" or block != BLOCK or x.ndim != 2 or x.shape[0] < GPU_KERNEL_MIN_TOKENS:
        return False
    if not hardware.is_hopper():
        return False
    from pallas_kernels import gpu_gate_up

    return gpu_gate_up.supports(x.shape[0], x.shape[1], kernel.shape[1], x.dtype, kernel.dtype)


def silu_gate_up(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *, block: int, use_kernels: bool
) -> jax.Array:
    """silu(gate) * up of x [T, D] and the interleaved kernel [D, 2F] (+ bias [2F]): [T, F].
    use_kernels: the attention backend is `pallas`, so a Pallas kernel may serve the call
    (the fused Mosaic GPU kernel on Hopper for steps of `GPU_KERNEL_MIN_TOKENS` or more;
    `PAGEJAX_GPU_GATE_UP=xla` turns it off)."""
    if use_kernels and bias is None and _use_gpu_kernel(x, kernel, block):
        from pallas_kernels import gpu_gate_up

        return gpu_gate_up.silu_gate_up(x, kernel)
    y = x @ kernel
    return silu_gate_up_reference(y if bias is None else y + bias, block)
