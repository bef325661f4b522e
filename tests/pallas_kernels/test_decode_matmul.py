"""The fused decode matmul (pallas_kernels/gpu_decode_matmul.py): its jnp reference against
numpy, the Triton kernel in interpret mode against both, and the kernel cross-lowered for
CUDA, on the CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gate_up
from pallas_kernels import gpu_decode_matmul as dm

EPS = 1e-5
CFG = dm.DecodeMatmulConfig(block_n=32, block_k=128)


def _numpy(x, w, nw=None, residual=None, gate_up_block=None):
    """float64 numpy: RMSNorm, matmul, then silu * up of interleaved columns or + residual."""
    x = x.astype(np.float64)
    if nw is not None:
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * nw
    y = x @ w.astype(np.float64)
    if gate_up_block:
        m, n = y.shape
        pairs = y.reshape(m, n // (2 * gate_up_block), 2, gate_up_block)
        gate, up = pairs[:, :, 0], pairs[:, :, 1]
        y = (gate / (1 + np.exp(-gate)) * up).reshape(m, n // 2)
    if residual is not None:
        y = y + residual
    return y


def _case(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = (rng.normal(size=(k, n)) * 0.05).astype(np.float32)
    nw = (1 + 0.2 * rng.normal(size=k)).astype(np.float32)
    r = rng.normal(size=(m, n)).astype(np.float32)
    return x, w, nw, r


VARIANTS = {
    "plain": dict(),
    "norm": dict(norm=True),
    "residual": dict(residual=True),
    "norm_residual_next_norm": dict(norm=True, residual=True, next_norm=True),
    "norm_gate_up": dict(norm=True, gate_up=True),
}


def _reference_kwargs(variant, nw, r, as_array=jnp.asarray):
    v = VARIANTS[variant]
    kw = {"eps": EPS}
    if v.get("norm"):
        kw["norm_weight"] = as_array(nw)
    if v.get("residual"):
        kw["residual"] = as_array(r)
    if v.get("gate_up"):
        kw["gate_up_block"] = 64
    return kw


def _kernel_kwargs(variant, x, nw, r, nw_next, as_array=jnp.asarray):
    """The reference's keywords as the kernel takes them: with a norm, x * norm weight and the
    sums of x^2 (`norm_inputs`, as two partials, as a producer would hand them) instead of the
    norm's weight; with `next_norm`, the next norm's weight."""
    kw = _reference_kwargs(variant, nw, r, as_array)
    x = as_array(x)
    if "norm_weight" in kw:
        x, sq = dm.norm_inputs(x, kw.pop("norm_weight"))
        kw["row_sq"] = jnp.concatenate([0.25 * sq, 0.75 * sq])  # any split of the sums
    if VARIANTS[variant].get("next_norm"):
        kw["next_norm_weight"] = as_array(nw_next)
    return x, kw


def _next_norm_numpy(y, nw_next, sq):
    """What the residual add hands the next norm: y * weight, and partials that sum to y^2."""
    return y * nw_next, (y * y).sum(axis=1), np.asarray(sq).sum(axis=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [16, 32])
def test_float32_kernel_and_reference_match_numpy(variant, m):
    x, w, nw, r = _case(m, 512, 256)
    nw_next = 1 + 0.3 * np.random.default_rng(7).normal(size=256).astype(np.float32)
    ref_kw = _reference_kwargs(variant, nw, r)
    want = _numpy(
        x,
        w,
        nw if "norm_weight" in ref_kw else None,
        r if "residual" in ref_kw else None,
        ref_kw.get("gate_up_block"),
    )
    ref = dm.decode_matmul_reference(jnp.asarray(x), jnp.asarray(w), **ref_kw)
    kx, kw = _kernel_kwargs(variant, x, nw, r, nw_next)
    got = dm.decode_matmul(kx, jnp.asarray(w), config=CFG, interpret=True, **kw)
    if "next_norm_weight" in kw:
        got, hw, sq = got
        assert sq.shape == (256 // CFG.block_n, m)
        want_hw, want_sq, got_sq = _next_norm_numpy(want, nw_next, sq)
        np.testing.assert_allclose(np.asarray(hw), want_hw, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_sq, want_sq, rtol=1e-4)
    assert got.shape == want.shape == ref.shape
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_kernel_matches_the_reference(variant):
    x, w, nw, r = _case(16, 256, 384, seed=1)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    nw_next = bf(1 + 0.3 * np.random.default_rng(8).normal(size=384))
    kx, kw = _kernel_kwargs(variant, x, nw, r, nw_next, bf)
    cfg = dm.DecodeMatmulConfig(block_n=64, block_k=64, num_warps=8, num_stages=3)
    got = dm.decode_matmul(kx, bf(w), config=cfg, interpret=True, **kw)
    ref = dm.decode_matmul_reference(bf(x), bf(w), **_reference_kwargs(variant, nw, r, bf))
    close = functools.partial(np.testing.assert_allclose, rtol=3e-2, atol=6e-2)
    if "next_norm_weight" in kw:
        got, hw, sq = got
        want_hw, want_sq = dm.norm_inputs(got, nw_next)  # from the rounded output, as HF's norm
        assert hw.dtype == jnp.bfloat16 and sq.dtype == jnp.float32
        close(np.asarray(hw, np.float32), np.asarray(want_hw, np.float32))
        np.testing.assert_allclose(np.asarray(sq).sum(0), np.asarray(want_sq)[0], rtol=1e-5)
    assert got.dtype == jnp.bfloat16
    close(np.asarray(got, np.float32), np.asarray(ref, np.float32))


@pytest.mark.parametrize("block_n", [32, 64, 128])
def test_gate_up_epilogue_reads_the_interleaved_layout(block_n):
    """The kernel's silu * up on a weight interleaved by gate_up.interleave equals the plain
    [gate | up] computation, whether a program takes a whole gate/up block pair (128 columns)
    or part of one."""
    x, w, nw, _ = _case(16, 128, 256, seed=2)
    plain_gate, plain_up = w[:, :128], w[:, 128:]
    wi = gate_up.interleave(w, 64)
    cfg = dm.DecodeMatmulConfig(block_n=block_n, block_k=128)
    got = dm.decode_matmul(jnp.asarray(x), jnp.asarray(wi), gate_up_block=64, config=cfg,
                           interpret=True)  # fmt: skip
    g, u = x.astype(np.float64) @ plain_gate, x.astype(np.float64) @ plain_up
    np.testing.assert_allclose(np.asarray(got), g / (1 + np.exp(-g)) * u, rtol=1e-4, atol=1e-4)


def test_unsupported_shapes_and_epilogues_are_refused():
    x, w, nw, r = _case(16, 256, 256)
    x, w, r = jnp.asarray(x), jnp.asarray(w), jnp.asarray(r)
    with pytest.raises(NotImplementedError):  # M not a multiple of 16
        dm.decode_matmul(x[:8], w, config=CFG, interpret=True)
    with pytest.raises(NotImplementedError):  # K not a multiple of block_k
        dm.decode_matmul(x[:, :200], w[:200], config=CFG, interpret=True)
    with pytest.raises(NotImplementedError):  # three partials: not one Triton tile
        dm.decode_matmul(x, w, row_sq=jnp.ones((3, 16)), config=CFG, interpret=True)
    with pytest.raises(ValueError):
        dm.decode_matmul(x, w, residual=r, gate_up_block=64, config=CFG, interpret=True)
    with pytest.raises(ValueError):  # the next norm's inputs come from a residual add
        dm.decode_matmul(x, w, next_norm_weight=jnp.ones(256), config=CFG, interpret=True)
    assert dm.supports(16, 4096, 6144, dm.DecodeMatmulConfig(), None)
    assert not dm.supports(16, 4096, 6144, dm.DecodeMatmulConfig(block_n=64 * 5), None)
    assert not dm.supports(48, 4096, 6144, dm.DecodeMatmulConfig(), None)  # Triton: 2^n rows
    assert not dm.supports(16, 4096, 28672, dm.DecodeMatmulConfig(block_n=96), 64)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [16, 32, 64])
def test_kernel_lowers_for_cuda(variant, m):
    sds = jax.ShapeDtypeStruct
    n = 28672 if VARIANTS[variant].get("gate_up") else 4096
    x, w = sds((m, 4096), jnp.bfloat16), sds((4096, n), jnp.bfloat16)
    kw = {}
    if VARIANTS[variant].get("norm"):
        kw["row_sq"] = sds((128, m), jnp.float32)
    if VARIANTS[variant].get("residual"):
        kw["residual"] = sds((m, n), jnp.bfloat16)
    if VARIANTS[variant].get("next_norm"):
        kw["next_norm_weight"] = sds((n,), jnp.bfloat16)
    cfg = dm.DecodeMatmulConfig(block_n=128 if n == 28672 else 32, block_k=128, num_stages=4)
    fn = functools.partial(
        dm.decode_matmul, eps=EPS, gate_up_block=64 if n == 28672 else None, config=cfg
    )
    text = jax.jit(fn).trace(x, w, **kw).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
