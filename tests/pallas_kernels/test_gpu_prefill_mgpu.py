"""The Mosaic GPU prompt-chunk kernel on the CPU: its tile table, the split with the Triton
kernel, and cross-lowering. No interpreter runs Mosaic GPU kernels, so the tile table is checked
by a numpy model of what each compute warpgroup does with it (its rows, its key blocks, its
causal mask), against the reference; the kernel itself runs in `test_gpu.py` on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import gpu_prefill_mgpu as mgpu
from pallas_kernels import gpu_ragged_paged_attention as gpu
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
}


def _batch(name, num_heads=4, num_kv_heads=2, head_dim=16, seed=0):
    q_lens, kv_lens, t, r, s, p = SCENARIOS[name]
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
    )
    return kernel_args(b)


def _warpgroup_model(args, block_kv, active=None, min_q_len=1):
    """What the kernel computes from the tile table, in numpy: out [T, N, H] (NaN where no
    warpgroup wrote) and how many times each row was written."""
    q, kv, kv_lens, page_table, query_start, num_seqs = (np.asarray(a) for a in args)
    num_tokens, num_heads, _ = q.shape
    num_kv_heads, page_size = kv.shape[1], kv.shape[3]
    tiles = mgpu.tile_table(
        *(jnp.asarray(a) for a in (query_start, kv_lens, num_seqs)),
        num_tokens=num_tokens,
        rows=ROWS,
        block_kv=block_kv,
        active=active,
        min_q_len=min_q_len,
    )
    out = np.full(q.shape, np.nan, np.float32)
    written = np.zeros(num_tokens, int)
    for req, row0, tok_start, tok_end, pos0, blk_hi in np.asarray(tiles):
        assert row0 % 8 == 0, "a q tile must start on the 8-row grid (TMA into tiled smem)"
        for w in range(ROWS // BLOCK_Q):  # as `wg_rows` in the kernel
            base = row0 + w * BLOCK_Q
            lo, hi = np.clip([tok_start - base, tok_end - base], 0, BLOCK_Q)
            if hi <= lo:
                continue
            steps = int(np.clip((pos0 + w * BLOCK_Q + hi - 1) // block_kv + 1, 0, blk_hi))
            keys = np.arange(steps * block_kv)
            page_idx = np.minimum(keys // page_size, page_table.shape[1] - 1)
            pages = page_table[req, page_idx]
            for head in range(num_heads):
                kv_head = head // (num_heads // num_kv_heads)
                k = kv[0, kv_head, pages, keys % page_size].astype(np.float32)
                v = kv[1, kv_head, pages, keys % page_size].astype(np.float32)
                for r in range(lo, hi):
                    s = q[base + r, head].astype(np.float32) @ k.T * SM_SCALE
                    s[keys > pos0 + w * BLOCK_Q + r] = -np.inf  # causal, by position
                    if not np.isfinite(s).any():  # the padding rows: no keys
                        out[base + r, head] = 0
                        continue
                    p = np.exp(s - s.max())
                    out[base + r, head] = p @ v / p.sum()
            written[base + lo : base + hi] += 1
    return out, written


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("block_kv", [8, 16])
def test_tile_table_covers_each_row_once_with_its_keys(name, block_kv):
    args = _batch(name)
    out, written = _warpgroup_model(args, block_kv)
    assert (written == 1).all(), written
    ref = ragged_paged_attention_reference(*args, sm_scale=SM_SCALE)
    np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_tile_table_of_the_long_requests_only(name):
    """With `active` (the split of dispatch.py), exactly the active requests' rows are
    covered, and the table bound for requests of at least `min_q_len` rows holds."""
    args = _batch(name)
    query_start, num_seqs = np.asarray(args[4]), int(args[5][0])
    q_lens = np.diff(query_start)
    long = (q_lens >= 9) & (np.arange(len(q_lens)) < num_seqs)
    active = jnp.asarray(np.concatenate([long, [False]]))
    out, written = _warpgroup_model(args, 8, active=active, min_q_len=9)
    rows = np.zeros(len(written), bool)
    for r in np.flatnonzero(long):
        rows[query_start[r] : query_start[r + 1]] = True
    assert (written == rows).all(), (written, rows)
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=SM_SCALE))
    np.testing.assert_allclose(out[rows], ref[rows], atol=1e-5, rtol=1e-5)


def test_triton_kernel_writes_only_active_rows_into_out():
    """The other half of the split: Triton writes the active requests (and padding) into the
    buffer it is given and leaves the rest of it as it was."""
    args = _batch("mixed")
    query_start, num_seqs = np.asarray(args[4]), int(args[5][0])
    short = np.diff(query_start) < 9
    short[num_seqs:] = False
    active = jnp.asarray(np.concatenate([short, [True]]))
    before = jnp.full(args[0].shape, 7.0, args[0].dtype)
    out = gpu.ragged_paged_attention(
        *args,
        sm_scale=SM_SCALE,
        config=gpu.GpuBlockConfig(block_q=4, block_kv=8, num_splits=2),  # unsplit for `out`
        interpret=True,
        active=active,
        out=before,
    )
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=SM_SCALE))
    rows = np.zeros(args[0].shape[0], bool)
    for r in np.flatnonzero(short):
        rows[query_start[r] : query_start[r + 1]] = True
    rows[query_start[num_seqs] :] = True  # padding: zeros, written by Triton
    out = np.asarray(out)
    np.testing.assert_allclose(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert (out[~rows] == 7.0).all()


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
    ],
    ids=["llama8b", "mha64-page32-t203", "kv64-3steps"],
)
def test_mgpu_kernel_lowers_for_cuda(shape, page_size, config):
    fn = functools.partial(mgpu.ragged_paged_prefill, sm_scale=0.1, config=config)
    assert "mosaic_gpu" in _lower_for_cuda(fn, shape, page_size)


def test_split_lowers_both_kernels_for_cuda():
    fn = lambda *a: dispatch.gpu_attention(a, sm_scale=0.1, use_mgpu=True)
    text = _lower_for_cuda(fn, (2048, 16, 32, 8, 128))
    assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" in text


def test_mgpu_support_and_choice(monkeypatch):
    q = jnp.zeros((4096, 32, 128), jnp.bfloat16)
    cache = jnp.zeros((2, 8, 4, 16, 128), jnp.bfloat16)
    assert mgpu.supports(q.dtype, cache.dtype, 128, 16, None, None)
    assert not mgpu.supports(jnp.float32, jnp.float32, 128, 16, None, None)
    assert not mgpu.supports(q.dtype, cache.dtype, 128, 16, 512, None)  # sliding window
    assert not mgpu.supports(q.dtype, cache.dtype, 96, 16, None, None)
    assert not mgpu.supports(q.dtype, cache.dtype, 256, 16, None, None)  # shared memory
    assert not mgpu.supports(q.dtype, cache.dtype, 128, 4, None, None)  # pages off the 8-row grid
    monkeypatch.setenv("PAGEJAX_GPU_PREFILL", "mgpu")
    assert dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
    assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=True)
    monkeypatch.setenv("PAGEJAX_GPU_PREFILL", "triton")
    assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
    monkeypatch.setenv("PAGEJAX_GPU_PREFILL", "auto")  # the CPU is no Hopper GPU
    assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
    monkeypatch.setattr(dispatch, "_is_hopper", lambda: True)
    monkeypatch.delenv("PAGEJAX_GPU_PREFILL")  # the default: Triton alone, even on Hopper
    assert not dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
    monkeypatch.setenv("PAGEJAX_GPU_PREFILL", "auto")
    assert dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)  # a prompt step
    assert not dispatch._use_mgpu(q, cache, 256, None, None, interpret=False)  # many decodes
    assert not dispatch._use_mgpu(q[:1024], cache, 8, None, None, interpret=False)  # small
    monkeypatch.setenv("PAGEJAX_GPU_PREFILL", "cudnn")
    with pytest.raises(ValueError, match="PAGEJAX_GPU_PREFILL"):
        dispatch._use_mgpu(q, cache, 8, None, None, interpret=False)
