"""The Mosaic GPU kernel on the CPU: its work lists, the engine's choice of kernel,
cross-lowering, and the kernel in Mosaic GPU's interpreter. The work lists are checked by a
numpy model of what each compute warpgroup does with its items (its rows or heads, its key
blocks, its causal mask), computed by the kernel's own `WorkItems` jnp, against the reference.
The interpreter runs the whole kernel with jax 0.11 (jax 0.10's takes ~15 min a batch); the
kernel also runs in `test_gpu.py` on a GPU.
"""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch, hardware, mgpu_compat
from pallas_kernels import gpu_mosaic_attention as mgpu
from pallas_kernels.attention import AttentionMetadata
from pallas_kernels.reference import ragged_paged_attention_reference
from tests.pallas_kernels.ragged_batches import kernel_args, make_batch

SM_SCALE = 0.25
ROWS, BLOCK_Q = 16, 8  # tiles of two 8-row warpgroups: small, so requests span several tiles
# name: (q_lens, kv_lens, num_tokens, num_requests, page_size, pages_per_request); request
# starts off the 8-row grid, ragged ends, decodes, chunks with context, padding rows
SCENARIOS = {
    "prompts": ([30, 7, 13], [30, 7, 13], 56, 4, 4, 8),
    "mixed": ([1, 1, 20, 1, 9], [40, 5, 45, 16, 9], 40, 8, 4, 12),
    "chunks": ([17, 11], [50, 11], 32, 3, 8, 7),
    # more decode items than prompt items; decodes alone (no prompt tile, no padding rows)
    "decode_heavy": ([1] * 12 + [5], [10 + i for i in range(12)] + [20], 24, 16, 4, 8),
    "decodes_only": ([1] * 16, [3 + 2 * i for i in range(16)], 16, 16, 4, 10),
}


def _batch(name, num_heads, num_kv_heads, head_dim=16, seed=0, scenarios=None, **kw):
    """The kernel's arguments for `scenarios[name]` (default: SCENARIOS); `kw` to make_batch."""
    q_lens, kv_lens, t, r, s, p = (scenarios or SCENARIOS)[name]
    b = make_batch(
        seed,
        q_lens,
        kv_lens,
        num_tokens=t,
        num_requests=r,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=s,
        pages_per_request=p,
        **kw,
    )
    return kernel_args(b)


def _work_model(args, block_kv, num_ctas):
    """What the persistent kernel computes from its work lists, in numpy: out [T, N, H] (NaN
    where no warpgroup wrote), how many times each (row, head) was written, and the item kinds
    in the order the CTAs take them."""
    q, kv, kv_lens, page_table, query_start, num_seqs = (np.asarray(a) for a in args)
    num_tokens, num_heads, _ = q.shape
    num_kv_heads, page_size = kv.shape[1], kv.shape[3]
    tiles, decodes, counts = mgpu.work_lists(
        *(jnp.asarray(a) for a in (query_start, kv_lens, num_seqs)),
        num_tokens=num_tokens,
        rows=ROWS,
        block_kv=block_kv,
    )
    meta = jnp.concatenate([counts, tiles.reshape(-1), decodes.reshape(-1)])
    work = mgpu.WorkItems(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        block_q=BLOCK_Q,
        block_kv=block_kv,
        num_ctas=num_ctas,
        tiles_at=counts.size,
        decodes_at=counts.size + tiles.size,
    )
    m = jnp.arange(int(work.count(meta)))  # every item at once: the same jnp, on arrays
    taken = [
        cta + i * num_ctas
        for cta in range(num_ctas)
        for i in range(int(work.num_items_of(meta, cta)))
    ]
    assert sorted(taken) == list(range(len(m))), "the CTAs' shares partition the items"
    it = work.item(meta, m)
    parts = [[np.asarray(x) for x in work.warpgroup(it, w)] for w in range(2)]
    is_dec, req, kv_head, q_head = (np.asarray(x) for x in it[:4])
    load_head, first, _ = (np.asarray(x) for x in work.decode_heads(it))
    assert (load_head % work.q_rows == 0).all() and (load_head + work.q_rows <= num_heads).all()
    out = np.full(q.shape, np.nan, np.float32)
    written = np.zeros((num_tokens, num_heads), int)
    for i in range(len(m)):
        for w in range(2):
            base, lo, hi, steps, first_pos, row_step = (int(x[i]) for x in parts[w])
            if not is_dec[i]:
                assert base % 8 == 0, "a q tile must start on the 8-row grid (TMA into tiled smem)"
            keys = np.arange(steps * block_kv)
            page_idx = np.minimum(keys // page_size, page_table.shape[1] - 1)
            pages = page_table[req[i], page_idx]
            k = kv[0, kv_head[i], pages, keys % page_size].astype(np.float32)
            v = kv[1, kv_head[i], pages, keys % page_size].astype(np.float32)
            for r in range(lo, hi):
                # A prompt tile's rows are tokens of one head; a decode's rows its group's heads,
                # from row `first` of the heads loaded.
                row, head = (
                    (base, load_head[i] + first[i] + r) if is_dec[i] else (base + r, q_head[i])
                )
                s = q[row, head].astype(np.float32) @ k.T * SM_SCALE
                s[keys > first_pos + r * row_step] = -np.inf  # causal, by position
                written[row, head] += 1
                if not np.isfinite(s).any():  # the padding rows: no keys
                    out[row, head] = 0
                    continue
                p = np.exp(s - s.max())
                out[row, head] = p @ v / p.sum()
    return out, written, is_dec


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("num_ctas, block_kv", [(2, 8), (6, 16), (132, 8)])
def test_work_items_cover_each_row_and_head_once_with_its_keys(name, num_ctas, block_kv):
    args = _batch(name, num_heads=8, num_kv_heads=2)
    out, written, _ = _work_model(args, block_kv, num_ctas)
    assert (written == 1).all(), written
    ref = ragged_paged_attention_reference(*args, sm_scale=SM_SCALE)
    np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(8, 8), (16, 1), (32, 2)], ids=["g1", "g16", "n32g16"])
def test_decode_items_find_their_heads_in_any_group(heads):
    """Groups of 1 (8 heads loaded for one), 16 (two 8-row tile groups) and 16 of 32 heads."""
    args = _batch("mixed", num_heads=heads[0], num_kv_heads=heads[1])
    out, written, _ = _work_model(args, 8, num_ctas=4)
    assert (written == 1).all(), written
    ref = ragged_paged_attention_reference(*args, sm_scale=SM_SCALE)
    np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_work_items_alternate_kinds_across_ctas():
    """While both kinds last, each round of `num_ctas` items is half decodes, and a CTA takes
    the kinds in turn, so decodes' streaming runs beside prompt tiles' compute."""
    q_lens, kv_lens = [1] * 12 + [20, 9], [30 + i for i in range(12)] + [45, 9]
    b = make_batch(
        0,
        q_lens,
        kv_lens,
        num_tokens=48,
        num_requests=16,
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        page_size=4,
        pages_per_request=12,
    )
    _, written, is_dec = _work_model(kernel_args(b), 8, num_ctas=4)
    assert (written == 1).all()
    paired = 2 * min(is_dec.sum(), (~is_dec).sum())  # 12 decodes x 2 KV heads = 24
    rounds = is_dec[:paired].reshape(-1, 4)
    assert (rounds.sum(axis=1) == 2).all(), rounds
    assert (rounds[1:] != rounds[:-1]).all(), rounds  # each CTA alternates


def _lower_for_cuda(fn, shape, page_size=16):
    t, r, n, k, h = shape
    avals = [
        ((t, n, h), jnp.bfloat16),
        ((2, k, 64, page_size, h), jnp.bfloat16),
        ((r,), jnp.int32),
        ((r, 16), jnp.int32),
        ((r + 1,), jnp.int32),
        ((1,), jnp.int32),
    ]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in avals]
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "shape, page_size, config",
    [
        ((256, 8, 32, 8, 128), 16, mgpu.MgpuConfig()),
        ((203, 4, 8, 1, 64), 32, mgpu.MgpuConfig()),  # T off the 8-row grid: padded
        ((256, 8, 32, 8, 128), 16, mgpu.MgpuConfig(block_kv=64, max_concurrent_steps=3)),
        ((256, 8, 64, 4, 128), 16, mgpu.MgpuConfig(num_ctas=8)),  # groups of 16 heads
    ],
    ids=["llama8b", "mha64-page32-t203", "kv64-3steps", "group16-ctas8"],
)
def test_mgpu_kernel_lowers_for_cuda(shape, page_size, config):
    fn = functools.partial(mgpu.ragged_paged_attention, sm_scale=0.1, config=config)
    assert "mosaic_gpu" in _lower_for_cuda(fn, shape, page_size)


def test_dispatch_lowers_the_mosaic_kernel_alone_for_cuda():
    fn = lambda *a: dispatch.gpu_attention(a, sm_scale=0.1, use_mgpu=True)
    text = _lower_for_cuda(fn, (2048, 16, 32, 8, 128))
    assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" not in text


def test_ptxas_is_asked_for_its_version_once(monkeypatch):
    """Mosaic GPU's lowering asks ptxas for its PTX ISA version in each narrow conversion, and
    each answer runs ptxas (11.7 ms; 168 times a bucket). After `ask_ptxas_once` the
    extension's function answers from the first call. The extension exists only with the
    CUDA plugin, so a stand-in with the same names takes its place here."""
    calls = []

    def ask():
        calls.append(1)
        return 90

    ext = types.SimpleNamespace(_get_ptxas_isa_version=ask)
    fake = types.SimpleNamespace(_mosaic_gpu_ext=ext)
    monkeypatch.setitem(sys.modules, "jax._src.lib.mosaic_gpu", fake)
    monkeypatch.setattr(jax._src.lib, "mosaic_gpu", fake, raising=False)
    mgpu_compat.ask_ptxas_once()
    mgpu_compat.ask_ptxas_once()  # idempotent: no second wrapper
    assert [ext._get_ptxas_isa_version() for _ in range(3)] == [90, 90, 90]
    assert len(calls) == 1
    assert ext._get_ptxas_isa_version.__wrapped__ is ask


def test_jax_still_asks_ptxas_where_ask_ptxas_once_answers():
    """`ask_ptxas_once` caches a function that Mosaic GPU's `astype` calls through the
    extension module at each call. If jax stops calling it there, the cache becomes a no-op
    (and the lowering costs may come back elsewhere): this checks jax's source still does."""
    import inspect

    from jax.experimental.mosaic.gpu import fragmented_array

    source = inspect.getsource(fragmented_array.FragmentedArray.astype)
    assert "_mosaic_gpu_ext._get_ptxas_isa_version()" in source


def test_mgpu_support_and_choice(monkeypatch):
    q = jnp.zeros((4096, 32, 128), jnp.bfloat16)
    cache = jnp.zeros((2, 8, 4, 16, 128), jnp.bfloat16)
    bf16 = jnp.bfloat16
    fits = lambda *a, heads=(32, 8): mgpu.supports(*a, num_heads=heads[0], num_kv_heads=heads[1])
    assert fits(bf16, bf16, 128, 16, None, None)
    assert not fits(jnp.float32, jnp.float32, 128, 16, None, None)
    assert not fits(bf16, bf16, 128, 16, 512, None)  # sliding window
    assert not fits(bf16, bf16, 96, 16, None, None)
    assert not fits(bf16, bf16, 256, 16, None, None)  # shared memory
    assert not fits(bf16, bf16, 128, 4, None, None)  # pages off the 8-row grid
    assert fits(bf16, bf16, 128, 16, None, None, heads=(16, 16))  # a decode loads 8 heads
    assert fits(bf16, bf16, 128, 16, None, None, heads=(64, 4))
    assert not fits(bf16, bf16, 128, 16, None, None, heads=(28, 4))  # groups of 7
    assert not fits(bf16, bf16, 128, 16, None, None, heads=(4, 2))  # under 8 heads
    assert not fits(bf16, bf16, 128, 16, None, None, mgpu.MgpuConfig(max_concurrent_steps=3))
    assert fits(bf16, bf16, 64, 16, None, None, mgpu.MgpuConfig(max_concurrent_steps=3))
    assert not fits(bf16, bf16, 128, 16, None, None, mgpu.MgpuConfig(block_q=128))
    with pytest.raises(ValueError, match="sliding window"):
        dispatch.gpu_attention((q,), sm_scale=0.1, use_mgpu=True, sliding_window=64)
    for choice in ("mgpu", "auto"):  # the CPU is no Hopper GPU
        monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", choice)
        assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
    monkeypatch.setattr(hardware, "is_hopper", lambda: True)
    monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", "mgpu")
    assert dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
    assert dispatch._use_mgpu(q[:16], cache, 16, None, None, interpret=False)  # every step
    assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=True)
    assert not dispatch._use_mgpu(q, cache, 8, 512, None, interpret=False)  # Triton's
    monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", "triton")
    assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
    monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", "auto")
    assert dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)  # long prompt chunks
    assert dispatch._use_mgpu(q, cache, 256, None, None, interpret=False)
    assert not dispatch._use_mgpu(q, cache, 257, None, None, interpret=False)  # many requests
    assert not dispatch._use_mgpu(q[:1024], cache, 8, None, None, interpret=False)  # small
    monkeypatch.delenv("PAGEJAX_GPU_ATTENTION")  # the default is auto
    assert dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
    assert not dispatch._use_mgpu(q, cache, 257, None, None, interpret=False)
    # The engine's pick (AttentionMetadata.gpu_kernel) overrides the bucket rule both ways.
    assert dispatch._use_mgpu(q, cache, 1024, None, None, interpret=False, kernel="mgpu")
    assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=False, kernel="triton")
    assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=True, kernel="mgpu")
    with pytest.raises(ValueError, match="does not support"):
        dispatch._use_mgpu(q, cache, 8, 512, None, interpret=False, kernel="mgpu")
    monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="PAGEJAX_GPU_ATTENTION"):
        dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)


def test_the_engine_picks_the_kernel_only_under_auto_on_hopper_for_a_supported_model(monkeypatch):
    bf16, llama = jnp.bfloat16, dict(num_heads=32, num_kv_heads=8)
    picks = lambda *a, **kw: dispatch.host_picks_kernel(*a, **{**llama, **kw})
    monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", "auto")
    monkeypatch.setattr(hardware, "is_hopper", lambda: False)
    assert not picks(bf16, 128, 16, None, None)
    monkeypatch.setattr(hardware, "is_hopper", lambda: True)
    assert picks(bf16, 128, 16, None, None)
    assert not picks(jnp.float32, 128, 16, None, None)
    assert not picks(bf16, 128, 16, 4096, None)  # sliding window
    assert not picks(bf16, 128, 16, None, None, num_heads=28, num_kv_heads=4)
    for choice in ("triton", "mgpu"):  # one kernel for every step: nothing to pick
        monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", choice)
        assert not picks(bf16, 128, 16, None, None)
    monkeypatch.delenv("PAGEJAX_GPU_ATTENTION")  # the default is auto
    assert picks(bf16, 128, 16, None, None)


@pytest.mark.parametrize("kernel, marker", [("mgpu", "mosaic_gpu"), ("triton", "xla.gpu.triton")])
def test_the_engine_pick_reaches_the_lowered_step(kernel, marker, monkeypatch):
    """AttentionMetadata.gpu_kernel is static: it decides which kernel the cuda lowering
    holds, whatever the bucket rule would say (2,048 tokens of 256 requests: Triton's)."""
    monkeypatch.setattr(hardware, "is_hopper", lambda: True)
    t, r, n, k, h = 2048, 256, 32, 8, 128

    def step(q, kv, cache, kv_lens, pages, starts, num_seqs, slots):
        meta = AttentionMetadata(slots, pages, kv_lens, starts, num_seqs, gpu_kernel=kernel)
        return dispatch.paged_attention(q, kv, kv, cache, meta, sm_scale=0.1, platform="cuda")

    avals = [
        ((t, n, h), jnp.bfloat16),
        ((t, k, h), jnp.bfloat16),
        ((2, k, 64, 16, h), jnp.bfloat16),
        ((r,), jnp.int32),
        ((r, 16), jnp.int32),
        ((r + 1,), jnp.int32),
        ((1,), jnp.int32),
        ((t,), jnp.int32),
    ]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in avals]
    text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert marker in text
    assert ("mosaic_gpu" in text) == (kernel == "mgpu")


JAX_0_11 = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)
# (q_lens, kv_lens, num_tokens, num_requests, page_size, pages_per_request) at the kernel's own
# tile sizes (64-row warpgroups, 64-key blocks): prompt tiles and decodes of several key blocks.
INTERPRETED = {
    "mixed": ([1, 1, 100, 1, 37], [900, 5, 400, 64, 37], 160, 8, 16, 64),
    "odd_t": ([130, 1, 60], [130, 700, 60], 204, 4, 16, 64),  # T off the 8-row grid
    "decodes": ([1] * 20 + [50], [1 + 30 * i for i in range(20)] + [300], 80, 24, 16, 64),
}


@pytest.mark.skipif(not JAX_0_11, reason="jax 0.10's Mosaic GPU interpreter: ~15 min a batch")
@pytest.mark.parametrize("name", sorted(INTERPRETED))
def test_kernel_in_the_interpreter_matches_the_reference(name):
    """The whole kernel in Mosaic GPU's interpreter (TMA page copies, barriers, the memory and
    compute warpgroups, the online softmax, the stores) against the reference, two CTAs with
    several items each. One step differs from the GPU: P @ V is a jnp dot added to the
    accumulator, where the GPU runs a wgmma into an accumulator carried across key blocks
    (`pl.run_state`, which the interpreter cannot run)."""
    args = _batch(name, 8, 2, head_dim=128, scenarios=INTERPRETED, dtype=jnp.bfloat16)
    config = mgpu.MgpuConfig(num_ctas=2)
    out = mgpu.ragged_paged_attention(*args, sm_scale=128**-0.5, config=config, interpret=True)
    with jax.default_matmul_precision("float32"):
        ref = ragged_paged_attention_reference(*args, sm_scale=128**-0.5)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
    )
