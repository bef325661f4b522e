"""The fused decode matmul (pallas_kernels/gpu_decode_matmul.py): its jnp reference against
numpy, the Triton kernel in interpret mode against both, and the kernel cross-lowered for
CUDA, on the CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

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


HEADS = dm.QkvHeads(num_heads=4, num_kv_heads=2, head_dim=64)
PAGES, PAGE = 6, 16


def _qkv_case(m, dtype, seed=3):
    """x, a q/k/v weight of HEADS, a random cache, positions, and slots: distinct ones out of
    page 0 in a random order for the first M - 4 rows, padding rows (page 0) for the rest."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, 256)).astype(np.float32)
    w = (rng.normal(size=(256, HEADS.width)) * 0.05).astype(np.float32)
    cache = rng.normal(size=(2, 2, PAGES, PAGE, 64)).astype(np.float32)
    slots = rng.permutation(np.arange(PAGE, PAGES * PAGE))[: m - 4]
    slots = np.concatenate([slots, [0, 0, 3, PAGE - 1]]).astype(np.int32)
    positions = rng.integers(0, 8000, size=m).astype(np.int32)
    inv_freq = (1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(x), cast(w), cast(cache), jnp.asarray(positions), jnp.asarray(inv_freq), slots


def _qkv_numpy(y, positions, inv_freq, cache, slots):
    """float64: rotate-half RoPE on q and k of y [M, (N + 2K) H], whose heads hold RoPE's pairs
    side by side (x_i at 2i, x_{i + H/2} at 2i + 1: models/layout.py); k and v into their
    slots (page 0's rows dropped)."""
    n, k, h = HEADS.num_heads, HEADS.num_kv_heads, HEADS.head_dim
    # The angle is a float32 product, as in HF's models (at 8,000 its rounding moves cos by
    # ~4e-4); the rest in float64.
    angles = (positions.astype(np.float32)[:, None, None] * inv_freq).astype(np.float64)

    def rope(a):
        a1, a2 = a[..., 0::2], a[..., 1::2]
        out = np.empty_like(a)
        out[..., 0::2] = a1 * np.cos(angles) - a2 * np.sin(angles)
        out[..., 1::2] = a2 * np.cos(angles) + a1 * np.sin(angles)
        return out

    m = y.shape[0]
    q = rope(y[:, : n * h].reshape(m, n, h)).reshape(m, n * h)
    kk = rope(y[:, n * h : (n + k) * h].reshape(m, k, h))
    v = y[:, (n + k) * h :].reshape(m, k, h)
    cache = np.array(cache, np.float64).reshape(2, k, -1, h)
    for t, slot in enumerate(slots):
        if slot >= PAGE:
            cache[0, :, slot], cache[1, :, slot] = kk[t], v[t]
    return q, cache.reshape(2, k, PAGES, PAGE, h)


def test_qkv_reference_matches_numpy():
    x, w, cache, positions, inv_freq, slots = _qkv_case(16, jnp.float32)
    with jax.default_matmul_precision("float32"):
        y = np.asarray(x @ w)
    q, got = dm.qkv_reference(jnp.asarray(y), HEADS, positions, inv_freq, cache, slots)
    want_q, want = _qkv_numpy(y, np.asarray(positions), np.asarray(inv_freq), cache, slots)
    np.testing.assert_allclose(np.asarray(q), want_q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_n", [16, 32, 64])  # four programs a head, two, or one
@pytest.mark.parametrize("m", [16, 32])
def test_qkv_epilogue_float32_matches_numpy(block_n, m):
    """The kernel's RoPE and cache write after the split norm, against numpy: q, every slot of
    the cache (this step's rows written, the rest and page 0 as they were)."""
    x, w, cache, positions, inv_freq, slots = _qkv_case(m, jnp.float32)
    nw = (1 + 0.2 * np.random.default_rng(4).normal(size=256)).astype(np.float32)
    xw, sq = dm.norm_inputs(x, jnp.asarray(nw))
    cfg = dm.DecodeMatmulConfig(block_n=block_n, block_k=128)
    q, got = dm.decode_matmul(
        xw, w, row_sq=jnp.concatenate([0.5 * sq, 0.5 * sq]), eps=EPS, qkv=HEADS,
        positions=positions, inv_freq=inv_freq, kv_cache=cache, slot_ids=jnp.asarray(slots),
        config=cfg, interpret=True,
    )  # fmt: skip
    y = _numpy(np.asarray(x), np.asarray(w), nw)
    want_q, want = _qkv_numpy(y, np.asarray(positions), np.asarray(inv_freq), cache, slots)
    np.testing.assert_allclose(np.asarray(q), want_q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def _primitives(jaxpr, inside_kernel=False):
    """(primitive name, whether inside a pallas_call's kernel) of every equation, recursively."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, inside_kernel
        inner = inside_kernel or eqn.primitive.name == "pallas_call"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if isinstance(sub, jax_core.Jaxpr):
                    yield from _primitives(sub, inner)


def test_qkv_epilogue_takes_rope_tables():
    """RoPE's cos and sin are computed outside the kernel (one [M, H / 2] table each, shared by
    the programs and, in a model, by the layers), not in each program's epilogue: there they
    made qkv 2.5 us a layer slower at 64 rows on an H100 (docs/BENCHMARKS.md)."""
    x, w, cache, positions, inv_freq, slots = _qkv_case(16, jnp.bfloat16)
    kw = dict(positions=positions, inv_freq=inv_freq, kv_cache=cache, slot_ids=jnp.asarray(slots))
    cfg = dm.DecodeMatmulConfig(block_n=32, block_k=64)
    fn = functools.partial(dm.decode_matmul, qkv=HEADS, config=cfg, interpret=True, **kw)
    prims = list(_primitives(jax.make_jaxpr(fn)(x, w).jaxpr))
    assert ("pallas_call", False) in prims
    for trig in ("cos", "sin"):
        assert (trig, False) in prims and (trig, True) not in prims


def test_qkv_epilogue_bfloat16_matches_the_reference():
    x, w, cache, positions, inv_freq, slots = _qkv_case(16, jnp.bfloat16, seed=5)
    cfg = dm.DecodeMatmulConfig(block_n=32, block_k=64, num_warps=8, num_stages=3)
    kw = dict(positions=positions, inv_freq=inv_freq, kv_cache=cache, slot_ids=jnp.asarray(slots))
    q, got = dm.decode_matmul(x, w, qkv=HEADS, config=cfg, interpret=True, **kw)
    want_q, want = dm.qkv_reference(dm.decode_matmul_reference(x, w), HEADS, **kw)
    assert q.dtype == got.dtype == jnp.bfloat16
    close = functools.partial(np.testing.assert_allclose, rtol=3e-2, atol=6e-2)
    close(np.asarray(q, np.float32), np.asarray(want_q, np.float32))
    close(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_qkv_epilogue_refusals():
    x, w, cache, positions, inv_freq, slots = _qkv_case(16, jnp.float32)
    kw = dict(positions=positions, inv_freq=inv_freq, kv_cache=cache, slot_ids=jnp.asarray(slots))
    cfg = dm.DecodeMatmulConfig(block_n=32, block_k=128)
    with pytest.raises(ValueError):  # the epilogue needs the positions (and the rest)
        dm.decode_matmul(x, w, qkv=HEADS, config=cfg, interpret=True, **{**kw, "positions": None})
    run = functools.partial(dm.decode_matmul, qkv=HEADS, interpret=True)
    with pytest.raises(ValueError):  # no residual and no gate/up with the attention's epilogue
        run(x, w, residual=jnp.zeros((16, HEADS.width)), config=cfg, **kw)
    with pytest.raises(ValueError):  # a cache of other heads: the kernel would store past it
        run(x, w, config=cfg, **{**kw, "kv_cache": cache[:, :1]})
    with pytest.raises(ValueError):  # a slot a row, and a frequency a pair of a head
        run(x, w, config=cfg, **{**kw, "slot_ids": jnp.asarray(slots[:8])})
    with pytest.raises(NotImplementedError):  # 128 columns: past one head
        run(x, w, config=dm.DecodeMatmulConfig(128, 128), **kw)
    with pytest.raises(NotImplementedError):  # w is not q/k/v of these heads
        run(x, w[:, :256], config=cfg, **kw)


@pytest.mark.parametrize("m", [16, 32, 64])
@pytest.mark.parametrize("head_dim", [128, 96])
def test_qkv_epilogue_lowers_for_cuda(m, head_dim):
    """Llama-3-8B's q/k/v (32 / 8 heads of 128) with the engine's tiles, cache aliased; and
    heads of 96, whose RoPE tables ([M, 48]) are no power of two wide."""
    from pallas_kernels.decode_matmul import config_for

    sds = jax.ShapeDtypeStruct
    heads = dm.QkvHeads(32, 8, head_dim)
    fn = functools.partial(
        dm.decode_matmul, eps=EPS, qkv=heads, config=config_for(m, 4096, heads.width, None, heads)
    )
    args = dict(
        row_sq=sds((128, m), jnp.float32),
        positions=sds((m,), jnp.int32),
        inv_freq=sds((head_dim // 2,), jnp.float32),
        kv_cache=sds((2, 8, 1024, 16, head_dim), jnp.bfloat16),
        slot_ids=sds((m,), jnp.int32),
    )
    x, w = sds((m, 4096), jnp.bfloat16), sds((4096, heads.width), jnp.bfloat16)
    text = jax.jit(fn).trace(x, w, **args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "output_operand_alias" in text
