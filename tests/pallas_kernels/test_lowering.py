"""Cross-lowering on the CPU: every kernel lowers for `cuda` (Triton) and `tpu` (Mosaic).

This catches unsupported primitives, non-power-of-two Triton tiles and Mosaic shape errors
without hardware. It does not run the backends' own compilers (ptxas, Mosaic layout passes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import gpu_ragged_paged_attention as gpu
from pallas_kernels import tpu_ragged_paged_attention as tpu
from tests.pallas_kernels.ragged_batches import make_batch

# (num_tokens, num_requests, num_heads, num_kv_heads, head_dim, dtype, window, cap)
SHAPES = [
    (32, 32, 32, 8, 128, jnp.bfloat16, None, None),  # decode, Llama-3-8B heads
    (64, 8, 32, 8, 128, jnp.bfloat16, 128, 30.0),  # mixed, window + cap
    (64, 8, 8, 8, 64, jnp.float32, None, None),  # MHA, fp32, head_dim 64
    (32, 8, 28, 4, 128, jnp.bfloat16, None, None),  # G = 7: not a power of two
]


def _lower(fn, shape, platform: str) -> str:
    t, r, n, k, h, dtype, window, cap = shape
    b = make_batch(
        0,
        [1] * (r // 2),
        [33] * (r // 2),
        num_tokens=t,
        num_requests=r,
        num_heads=n,
        num_kv_heads=k,
        head_dim=h,
        page_size=16,
        pages_per_request=8,
        dtype=dtype,
    )
    m = b.meta
    f = functools.partial(fn, sm_scale=0.1, sliding_window=window, soft_cap=cap)
    args = (b.q, b.kv_cache, m.kv_lens, m.page_table, m.query_start, m.num_seqs)
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s[0]}r{s[1]}n{s[2]}k{s[3]}h{s[4]}")
def test_gpu_kernel_lowers_for_cuda(shape):
    assert "__gpu$xla.gpu.triton" in _lower(gpu.ragged_paged_attention, shape, "cuda")


def test_gpu_kernel_split_k_lowers_for_cuda():
    cfg = gpu.GpuBlockConfig(block_q=4, block_kv=128, num_splits=4, num_warps=8, num_stages=3)
    fn = functools.partial(gpu.ragged_paged_attention, config=cfg)
    assert "__gpu$xla.gpu.triton" in _lower(fn, SHAPES[0], "cuda")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"t{s[0]}r{s[1]}n{s[2]}k{s[3]}h{s[4]}")
def test_tpu_kernel_lowers_for_tpu(shape):
    assert "tpu_custom_call" in _lower(tpu.ragged_paged_attention, shape, "tpu")
