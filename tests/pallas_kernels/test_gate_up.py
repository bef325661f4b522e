"""The MLP's interleaved gate/up layout and its activation (pallas_kernels/gate_up.py), against
numpy; the fused Mosaic GPU kernel in Mosaic GPU's interpreter and cross-lowered, on the CPU
(test_gpu.py runs it on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gate_up, gpu_gate_up, hardware


def _silu(x):
    return x / (1.0 + np.exp(-x))


def test_interleave_alternates_gate_and_up_blocks():
    d, f, block = 3, 8, 2
    gate = np.arange(d * f).reshape(d, f)
    up = 1000 + gate
    w = gate_up.interleave(np.concatenate([gate, up], axis=1), block)
    for j in range(f // block):
        np.testing.assert_array_equal(w[:, 4 * j : 4 * j + 2], gate[:, 2 * j : 2 * j + 2])
        np.testing.assert_array_equal(w[:, 4 * j + 2 : 4 * j + 4], up[:, 2 * j : 2 * j + 2])
    np.testing.assert_array_equal(
        gate_up.deinterleave(w, block), np.concatenate([gate, up], axis=1)
    )


def test_interleave_of_a_bias_and_the_plain_layout_when_the_block_does_not_divide():
    bias = np.arange(12)
    want = [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]
    np.testing.assert_array_equal(gate_up.interleave(bias, 3), want)
    assert gate_up.block_for(192) == 64 and gate_up.block_for(112) == 112
    np.testing.assert_array_equal(gate_up.interleave(bias, 6), bias)  # one block: [gate | up]


@pytest.mark.parametrize("f, bias", [(192, False), (192, True), (112, True)])
def test_silu_gate_up_matches_numpy_on_the_interleaved_weight(f, bias):
    rng = np.random.default_rng(0)
    d, t = 32, 5
    x = rng.normal(size=(t, d)).astype(np.float32)
    wg, wu = rng.normal(size=(d, f)).astype(np.float32), rng.normal(size=(d, f)).astype(np.float32)
    bg, bu = rng.normal(size=f).astype(np.float32), rng.normal(size=f).astype(np.float32)
    block = gate_up.block_for(f)
    w = gate_up.interleave(np.concatenate([wg, wu], axis=1), block)
    b = gate_up.interleave(np.concatenate([bg, bu]), block) if bias else None
    with jax.default_matmul_precision("float32"):  # a GPU's default would round to bf16/TF32
        got = gate_up.silu_gate_up(
            jnp.asarray(x),
            jnp.asarray(w),
            None if b is None else jnp.asarray(b),
            block=block,
            use_kernels=True,  # 5 rows: below the kernel's steps, XLA and the reference
        )
    want = _silu(x @ wg + (bg if bias else 0)) * (x @ wu + (bu if bias else 0))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_kernel_choice(monkeypatch):
    """The fused kernel: on a Hopper GPU, steps of GPU_KERNEL_MIN_TOKENS or more, blocks of
    BLOCK, shapes it supports, unless PAGEJAX_GPU_GATE_UP=xla."""
    w = jnp.zeros((256, 512), jnp.bfloat16)
    rows = lambda m: jnp.zeros((m, 256), jnp.bfloat16)
    big = rows(gate_up.GPU_KERNEL_MIN_TOKENS)
    use = gate_up._use_gpu_kernel
    monkeypatch.setattr(hardware, "is_hopper", lambda: False)
    assert not use(big, w, 64)  # the CPU, or a GPU but not Hopper
    monkeypatch.setattr(hardware, "is_hopper", lambda: True)
    assert use(big, w, 64)
    assert not use(rows(gate_up.GPU_KERNEL_MIN_TOKENS // 2), w, 64)  # a decode-sized step
    assert not use(big, w, 256)  # the plain layout (block = F)
    assert not use(rows(gate_up.GPU_KERNEL_MIN_TOKENS + 8), w, 64)  # rows off the tile grid
    monkeypatch.setenv("PAGEJAX_GPU_GATE_UP", "xla")
    assert not use(big, w, 64)
    monkeypatch.setenv("PAGEJAX_GPU_GATE_UP", "fused")
    with pytest.raises(ValueError, match="PAGEJAX_GPU_GATE_UP"):
        use(big, w, 64)


def test_kernel_support():
    ok = lambda m, k, n, dt=jnp.bfloat16, wt=jnp.bfloat16, **cfg: gpu_gate_up.supports(
        m, k, n, dt, wt, gpu_gate_up.GateUpConfig(**cfg)
    )
    assert ok(1024, 4096, 28672)
    assert not ok(1000, 4096, 28672)  # rows: whole tiles of 128
    assert not ok(1024, 4096, 28672 - 128)  # columns: whole pairs of gate/up block pairs
    assert not ok(1024, 4096, 28672, jnp.float32, jnp.float32)
    assert not ok(1024, 4096, 28672, jnp.bfloat16, jnp.float16)
    assert ok(1024, 4096, 28672, tile_m=64) and not ok(1024, 4096, 28672, tile_m=96)


def test_default_config():
    """Slabs of 128 of K in a ring of 2 where they divide K (Llama-3-8B), else of 64 in a ring
    of 3 (SmolLM2-135M's 576), so that K a multiple of 64 keeps the kernel."""

    def slabs(k):
        config = gpu_gate_up.default_config(k)
        return config.tile_k, config.max_concurrent_steps

    assert slabs(4096) == (128, 2)
    assert slabs(576) == (64, 3)
    bf16 = jnp.bfloat16
    assert gpu_gate_up.supports(1024, 576, 3072, bf16, bf16)  # the default config for K
    assert not gpu_gate_up.supports(1024, 576, 3072, bf16, bf16, gpu_gate_up.default_config(4096))


@pytest.mark.parametrize("m, k, two_f", [(1024, 4096, 28672), (256, 128, 512)])
def test_fused_kernel_lowers_for_cuda(m, k, two_f):
    bf16 = jnp.bfloat16
    args = [jax.ShapeDtypeStruct((m, k), bf16), jax.ShapeDtypeStruct((k, two_f), bf16)]
    text = jax.jit(gpu_gate_up.silu_gate_up).trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in text.as_text()


@pytest.mark.parametrize(
    "m, k, f, config",
    [
        # One CTA walks 3 x 2 tiles (the persistent loop and the planar snake), through 4
        # K slabs in a ring of 2 slots (slots reused before the tile ends).
        (384, 256, 256, gpu_gate_up.GateUpConfig(max_concurrent_steps=2, num_ctas=1)),
        # The default tiles for K = 4096 (slabs of 128, a ring of 2), two slabs a tile.
        (256, 256, 128, gpu_gate_up.GateUpConfig(tile_k=128, max_concurrent_steps=2, num_ctas=1)),
        # More CTAs than tiles: the surplus CTAs take none; 64-row tiles, one epilogue tile.
        (128, 128, 128, gpu_gate_up.GateUpConfig(tile_m=64, grid_tile_width=1, num_ctas=3)),
    ],
    ids=["one_cta", "slabs_of_128", "idle_ctas"],
)
def test_fused_kernel_in_the_interpreter_matches_float32(m, k, f, config):
    """The kernel itself (TMA ring, barriers, both compute warpgroups' wgmma and epilogue
    stores) against numpy's float32 silu(x @ W_gate) * (x @ W_up)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = (rng.normal(size=(k, 2 * f)) * k**-0.5).astype(np.float32)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    wi = gate_up.interleave(wb, gate_up.BLOCK)
    got = gpu_gate_up.silu_gate_up(xb, wi, config=config, interpret=True)
    y = np.asarray(xb, np.float32) @ np.asarray(wb, np.float32)
    want = _silu(y[:, :f]) * y[:, f:]
    assert got.shape == (m, f) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)
