"""The Triton kernels compiled and run on a real NVIDIA GPU, against the reference.

Run: `pytest -m gpu tests/pallas_kernels/test_gpu.py` on a machine with a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch, hardware
from pallas_kernels import gpu_mosaic_attention as mgpu
from pallas_kernels import gpu_ragged_paged_attention as gpu
from pallas_kernels.reference import ragged_paged_attention_reference
from tests.pallas_kernels.ragged_batches import kernel_args, make_batch

pytestmark = pytest.mark.gpu

# (name, q_lens, kv_lens, num_tokens, num_requests, page_size, pages_per_request)
SCENARIOS = [
    ("decode", [1] * 30, [1 + 67 * i for i in range(30)], 32, 32, 16, 128),
    ("decode1", [1], [2000], 8, 8, 16, 128),  # one request: split-K carries it
    ("prefill", [300, 77], [300, 77], 384, 8, 16, 32),
    ("mixed", [1, 1, 100, 1, 37], [900, 5, 400, 64, 37], 160, 8, 32, 32),
    # 48 requests in a 64-request bucket: at 32 heads / 8 kv heads, the 64-key / 4-warp decode
    # tiles (last, so that SCENARIOS[3] stays the mixed batch)
    ("decode48", [1] * 48, [1 + 41 * i for i in range(48)], 64, 64, 16, 128),
    # 12 requests in a 16-request bucket: the 64-key tiles split 4 ways at 32 / 8 heads
    ("decode12", [1] * 12, [1 + 173 * i for i in range(12)], 16, 16, 16, 128),
]
HEADS = [(32, 8, 128), (8, 1, 64), (16, 16, 128), (28, 4, 128)]  # G = 4, 8, 1, 7


def _run(scenario, heads, dtype, window, cap, config=None, kernel=None):
    _, q_lens, kv_lens, t, r, s, p = scenario
    n, k, h = heads
    b = make_batch(
        0,
        q_lens,
        kv_lens,
        num_tokens=t,
        num_requests=r,
        num_heads=n,
        num_kv_heads=k,
        head_dim=h,
        page_size=s,
        pages_per_request=p,
        dtype=dtype,
    )
    args = kernel_args(b)
    kw = dict(sm_scale=h**-0.5, sliding_window=window, soft_cap=cap)
    if kernel is None:
        out = gpu.ragged_paged_attention(*args, **kw, config=config)
    else:
        out = jax.jit(functools.partial(kernel, sm_scale=kw["sm_scale"]))(*args)
    with jax.default_matmul_precision("float32"):  # not TF32: the reference is the truth
        ref = _reference_in_chunks(*args, **kw)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol
    )


def _reference_in_chunks(
    q, kv_cache, kv_lens, page_table, query_start, num_seqs, *, chunk=256, **kw
):
    """reference.py's attention, one call per `chunk` tokens of one request. The reference
    gathers every token's whole context in float32 ([K, T, P * S, H]): 16 GiB for the long
    chunks' step, which an H100 cannot hold beside the kernel's buffers. A chunk of a request
    is a request of its own, whose context ends at its last token. Padding tokens stay 0."""
    starts, lens = np.asarray(query_start), np.asarray(kv_lens)
    out = jnp.zeros_like(q)
    for i in range(int(np.asarray(num_seqs).reshape(()))):
        start, end = int(starts[i]), int(starts[i + 1])
        for a in range(start, end, chunk):
            b = min(a + chunk, end)
            piece = ragged_paged_attention_reference(
                q[a:b],
                kv_cache,
                jnp.asarray([lens[i] - (end - b)], jnp.int32),
                page_table[i : i + 1],
                jnp.asarray([0, b - a], jnp.int32),
                jnp.asarray([1], jnp.int32),
                **kw,
            )
            out = out.at[a:b].set(piece)
    return out


@pytest.fixture(autouse=True)
def _needs_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s[0])
@pytest.mark.parametrize("heads", HEADS, ids=lambda x: f"n{x[0]}k{x[1]}h{x[2]}")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_kernel(scenario, heads, dtype):
    _run(scenario, heads, dtype, None, None)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s[0])
def test_gpu_kernel_window_and_cap(scenario):
    _run(scenario, (32, 8, 128), jnp.bfloat16, 100, 30.0)


@pytest.mark.parametrize(
    "config",
    [
        gpu.GpuBlockConfig(block_q=4, block_kv=64, num_splits=8, num_warps=4, num_stages=2),
        gpu.GpuBlockConfig(block_q=4, block_kv=256, num_splits=1, num_warps=8, num_stages=3),
        gpu.GpuBlockConfig(block_q=32, block_kv=64, num_splits=1, num_warps=4, num_stages=3),
        # 128 rows beside 16-row decode tiles (two paths in one kernel), and split with them
        gpu.GpuBlockConfig(block_q=32, block_kv=128, num_splits=1, num_warps=8, num_stages=3),
        gpu.GpuBlockConfig(block_q=16, block_kv=32, num_splits=2, num_warps=4, num_stages=4),
    ],
)
def test_gpu_kernel_configs(config):
    _run(SCENARIOS[3], (32, 8, 128), jnp.bfloat16, None, None, config)


# Requests starting off the 8-row grid, ragged ends, decodes, chunks with context, padding.
MGPU_SCENARIOS = SCENARIOS + [
    ("ragged", [300, 77, 129], [300, 77, 129], 512, 8, 16, 32),
    ("page32", [150, 90], [500, 90], 256, 4, 32, 32),
    # T off the 8-row grid (q padded), a long request beside a decode and a short chunk
    ("odd_t", [130, 1, 60], [130, 700, 60], 204, 4, 16, 64),
    (
        "many",
        [613, 1, 1, 250, 999, 7, 64, 1, 333],
        [700, 50, 2000, 250, 1500, 7, 64, 900, 333],
        2304,
        12,
        16,
        128,
    ),
]


# Many decodes of assorted lengths beside two chunks: more items than CTAs, both kinds.
MGPU_SCENARIOS.append(
    (
        "decodes",
        [1] * 150 + [200, 33],
        [1 + 6 * i for i in range(150)] + [900, 33],
        512,
        160,
        16,
        64,
    )
)


@pytest.mark.parametrize("scenario", MGPU_SCENARIOS, ids=lambda s: s[0])
@pytest.mark.parametrize("heads", HEADS, ids=lambda x: f"n{x[0]}k{x[1]}h{x[2]}")
def test_mgpu_kernel(scenario, heads):
    n, k, h = heads
    if not mgpu.supports(
        jnp.bfloat16, jnp.bfloat16, h, 16, None, None, num_heads=n, num_kv_heads=k
    ):
        pytest.skip("a head group the kernel does not take (Triton serves it)")
    _run(scenario, heads, jnp.bfloat16, None, None, kernel=mgpu.ragged_paged_attention)


@pytest.mark.parametrize(
    "config",
    [
        mgpu.MgpuConfig(num_ctas=2),  # long chains of items in each CTA
        mgpu.MgpuConfig(block_kv=64, max_concurrent_steps=3, num_ctas=6),
    ],
    ids=["ctas2", "kv64-3steps-ctas6"],
)
@pytest.mark.parametrize("scenario", ["mixed", "decodes", "odd_t"])
def test_mgpu_kernel_configs(scenario, config):
    case = next(c for c in MGPU_SCENARIOS if c[0] == scenario)
    kernel = functools.partial(mgpu.ragged_paged_attention, config=config)
    _run(case, (32, 8, 128), jnp.bfloat16, None, None, kernel=kernel)


# A step of long prompt chunks: on Hopper `auto` gives it to the Mosaic kernel.
LONG_CHUNKS = ("long_chunks", [1500, 1, 300], [1500, 900, 300], 2048, 8, 16, 128)


@pytest.mark.parametrize("scenario", [SCENARIOS[3], LONG_CHUNKS], ids=lambda s: s[0])
@pytest.mark.parametrize("choice", ["triton", "auto"])
def test_dispatch_on_gpu(scenario, choice, monkeypatch):
    monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", choice)
    _, q_lens, kv_lens, t, r, s, p = scenario
    b = make_batch(
        1,
        q_lens,
        kv_lens,
        num_tokens=t,
        num_requests=r,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        page_size=s,
        pages_per_request=p,
        dtype=jnp.bfloat16,
    )
    picked = dispatch._use_mgpu(b.q, b.kv_cache, r, None, None, interpret=False)
    assert picked == (choice == "auto" and scenario is LONG_CHUNKS and hardware.is_hopper())
    out, kv = jax.jit(dispatch.paged_attention, static_argnames=("sm_scale",))(
        b.q, b.k, b.v, b.kv_cache, b.meta, sm_scale=0.1
    )
    ref = _reference_in_chunks(*kernel_args(b), sm_scale=0.1)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize("m, k, f", [(1024, 4096, 14336), (256, 512, 384), (2048, 2048, 256)])
def test_fused_gate_up_kernel_matches_float32(m, k, f):
    from pallas_kernels import gate_up, gpu_gate_up

    if not hardware.is_hopper():
        pytest.skip("Mosaic GPU kernel: Hopper only")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = (rng.normal(size=(k, 2 * f)) * k**-0.5).astype(np.float32)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    wi = gate_up.interleave(wb, gate_up.BLOCK)
    got = np.asarray(gpu_gate_up.silu_gate_up(xb, wi).astype(jnp.float32))
    y = np.asarray(xb, np.float32) @ np.asarray(wb, np.float32)
    gate, up = y[:, :f], y[:, f:]
    want = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    # The model's entry point takes the kernel from GPU_KERNEL_MIN_TOKENS rows on.
    assert gate_up._use_gpu_kernel(xb, wi, gate_up.BLOCK) == (m >= gate_up.GPU_KERNEL_MIN_TOKENS)
    via_model = gate_up.silu_gate_up(xb, wi, None, block=gate_up.BLOCK, use_kernels=True)
    via_model = np.asarray(via_model.astype(jnp.float32))
    np.testing.assert_allclose(via_model, want, rtol=2e-2, atol=2e-2)


# The four matmuls of a Llama-3-8B decode layer (K, N, norm, residual, gate/up block), at the
# engine's decode buckets. The model leaves down_proj to XLA (decode_matmul.py), the kernel
# still takes it.
DECODE_MATMULS = {
    "qkv": (4096, 6144, True, False, None),
    "o_proj": (4096, 4096, False, True, None),
    "gate_up": (4096, 28672, True, False, 64),
    "down": (14336, 4096, False, True, None),
}


@pytest.mark.parametrize("name", DECODE_MATMULS)
@pytest.mark.parametrize("m", [16, 64])
def test_decode_matmul_kernel_matches_the_reference(name, m):
    from pallas_kernels import decode_matmul, gpu_decode_matmul

    k, n, norm, res, block = DECODE_MATMULS[name]
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    kw, ref_kw = dict(gate_up_block=block), dict(gate_up_block=block, eps=1e-5)
    xk = x
    if norm:  # the norm's inputs as the producing residual add hands them (128 partials)
        ref_kw["norm_weight"] = (1 + 0.1 * jax.random.normal(keys[2], (k,))).astype(jnp.bfloat16)
        xk, sq = gpu_decode_matmul.norm_inputs(x, ref_kw["norm_weight"])
        kw.update(row_sq=jnp.tile(sq / 128, (128, 1)), eps=1e-5)
    if res:
        kw["residual"] = ref_kw["residual"] = jax.random.normal(keys[3], (m, n), jnp.bfloat16)
        kw["next_norm_weight"] = (1 + 0.1 * jax.random.normal(keys[4], (n,))).astype(jnp.bfloat16)
    got = decode_matmul.matmul(xk, w, mode="gpu", **kw)
    if res:
        got, hw, sq = got
        want_hw, want_sq = gpu_decode_matmul.norm_inputs(got, kw["next_norm_weight"])
        np.testing.assert_allclose(np.asarray(hw, np.float32), np.asarray(want_hw, np.float32))
        np.testing.assert_allclose(np.asarray(sq).sum(0), np.asarray(want_sq)[0], rtol=1e-4)
    f32 = {a: (b.astype(jnp.float32) if hasattr(b, "astype") else b) for a, b in ref_kw.items()}
    with jax.default_matmul_precision("float32"):
        ref = gpu_decode_matmul.decode_matmul_reference(
            x.astype(jnp.float32), w.astype(jnp.float32), **f32
        )
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=3e-2
    )


@pytest.mark.parametrize("m", [16, 64])
def test_qkv_epilogue_matches_the_reference(m):
    """Llama-3-8B's q/k/v with the attention's epilogue on the GPU: q after RoPE, and the cache
    with this step's rows written at permuted slots, page 0's (padding) dropped, the rest as
    it was."""
    from pallas_kernels import decode_matmul, gpu_decode_matmul

    heads = gpu_decode_matmul.QkvHeads(32, 8, 128)
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (m, 4096), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (4096, heads.width), jnp.float32) / 64).astype(jnp.bfloat16)
    cache = jax.random.normal(keys[2], (2, 8, 64, 16, 128), jnp.bfloat16)
    slots = np.random.default_rng(m).permutation(np.arange(16, 64 * 16))[:m].astype(np.int32)
    slots[-3:] = [0, 5, 0]  # padding tokens point into page 0
    positions = jax.random.randint(keys[3], (m,), 0, 8192, jnp.int32)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, 128, 2, dtype=jnp.float32) / 128))
    kw = dict(positions=positions, inv_freq=inv_freq, slot_ids=jnp.asarray(slots))
    q, got = decode_matmul.matmul(x, w, mode="gpu", qkv=heads, kv_cache=cache, **kw)
    with jax.default_matmul_precision("float32"):
        y = gpu_decode_matmul.decode_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32))
    want_q, want = gpu_decode_matmul.qkv_reference(
        y.astype(jnp.bfloat16), heads, kv_cache=cache, **kw
    )
    close = functools.partial(np.testing.assert_allclose, rtol=3e-2, atol=3e-2)
    close(np.asarray(q, np.float32), np.asarray(want_q, np.float32))
    close(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(got[:, :, 0]), np.asarray(cache[:, :, 0]))


@pytest.mark.parametrize("hidden, mlp", [(1024, 3584), (4096, 14336)])
def test_fused_decode_layers_match_xla_layers(hidden, mlp, monkeypatch):
    """The fused decode layers (the default: qkv, o_proj and gate/up as Triton kernels) against
    the XLA layers of the same model, compiled for the GPU (tests/hf_models.py
    `fused_against_xla_layers`). At 1,024 wide qkv and o_proj take 16 columns a program; at
    4,096 the 8B model's tiles."""
    from pallas_kernels.attention import AttentionBackend
    from tests.hf_models import fused_against_xla_layers

    monkeypatch.delenv("PAGEJAX_GPU_DECODE_MATMUL", raising=False)
    if not hardware.is_hopper():
        pytest.skip("the fused decode layers: Hopper only")
    fused, ref = fused_against_xla_layers(hidden, mlp, AttentionBackend.PALLAS)
    rel = np.abs(fused - ref).max() / np.abs(ref).max()
    assert rel <= 3e-2, f"max relative error {rel:.2e}"
    assert (fused.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
