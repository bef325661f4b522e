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
    "norm_residual": dict(norm=True, residual=True),
    "norm_gate_up": dict(norm=True, gate_up=True),
}


def _kwargs(variant, nw, r, as_array=jnp.asarray):
    v = VARIANTS[variant]
    kw = {"eps": EPS}
    if v.get("norm"):
        kw["norm_weight"] = as_array(nw)
    if v.get("residual"):
        kw["residual"] = as_array(r)
    if v.get("gate_up"):
        kw["gate_up_block"] = 64
    return kw


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [16, 32])
def test_float32_kernel_and_reference_match_numpy(variant, m):
    x, w, nw, r = _case(m, 512, 256)
    kw = _kwargs(variant, nw, r)
    want = _numpy(
        x,
        w,
        nw if "norm_weight" in kw else None,
        r if "residual" in kw else None,
        kw.get("gate_up_block"),
    )
    ref = dm.decode_matmul_reference(jnp.asarray(x), jnp.asarray(w), **kw)
    got = dm.decode_matmul(jnp.asarray(x), jnp.asarray(w), config=CFG, interpret=True, **kw)
    assert got.shape == want.shape == ref.shape
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_kernel_matches_the_reference(variant):
    x, w, nw, r = _case(16, 256, 384, seed=1)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    kw = _kwargs(variant, nw, r, bf)
    cfg = dm.DecodeMatmulConfig(block_n=64, block_k=64, num_warps=8, num_stages=3)
    got = dm.decode_matmul(bf(x), bf(w), config=cfg, interpret=True, **kw)
    ref = dm.decode_matmul_reference(bf(x), bf(w), **kw)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=6e-2
    )


def test_gate_up_epilogue_reads_the_interleaved_layout():
    """The kernel's silu * up on a weight interleaved by gate_up.interleave equals the plain
    [gate | up] computation."""
    x, w, nw, _ = _case(16, 128, 256, seed=2)
    plain_gate, plain_up = w[:, :128], w[:, 128:]
    wi = gate_up.interleave(w, 64)
    got = dm.decode_matmul(jnp.asarray(x), jnp.asarray(wi), gate_up_block=64, config=CFG,
                           interpret=True)  # fmt: skip
    g, u = x.astype(np.float64) @ plain_gate, x.astype(np.float64) @ plain_up
    np.testing.assert_allclose(np.asarray(got), g / (1 + np.exp(-g)) * u, rtol=1e-4, atol=1e-4)


def test_unsupported_shapes_and_epilogues_are_refused():
    x, w, nw, r = _case(16, 256, 256)
    with pytest.raises(NotImplementedError):  # M not a multiple of 16
        dm.decode_matmul(jnp.asarray(x[:8]), jnp.asarray(w), config=CFG, interpret=True)
    with pytest.raises(NotImplementedError):  # K not a multiple of block_k
        dm.decode_matmul(jnp.asarray(x[:, :200]), jnp.asarray(w[:200]), config=CFG, interpret=True)
    with pytest.raises(ValueError):
        dm.decode_matmul(jnp.asarray(x), jnp.asarray(w), residual=jnp.asarray(r),
                         gate_up_block=64, config=CFG, interpret=True)  # fmt: skip
    assert dm.supports(16, 4096, 6144, dm.DecodeMatmulConfig(), None)
    assert not dm.supports(16, 4096, 6144, dm.DecodeMatmulConfig(block_n=64 * 5), None)
    assert not dm.supports(48, 4096, 6144, dm.DecodeMatmulConfig(), None)  # Triton: 2^n rows


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [16, 32, 64])
def test_kernel_lowers_for_cuda(variant, m):
    x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096, 6144), jnp.bfloat16)
    nw = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((m, 6144), jnp.bfloat16)
    kw = _kwargs(variant, nw, r, as_array=lambda a: a)
    static = {key: kw.pop(key) for key in ("eps", "gate_up_block") if key in kw}
    fn = functools.partial(dm.decode_matmul, **static)
    text = jax.jit(fn).trace(x, w, **kw).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
