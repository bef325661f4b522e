"""`scripts/bench_kernels.py --engine-buckets`: a decode batch padded as the engine pads a step.
The bucket is the one the runner's rules give with the default GPU ladders (below 128 tokens a
token bucket has one request rung: 1-16 decodes run at 16 x 16, as tests/engine/test_buckets.py
pins), and the padded batch is one the kernel serves (the Triton kernel in interpret mode
against the jnp reference, padding rows zero)."""

from __future__ import annotations

import numpy as np

from pallas_kernels import gpu_ragged_paged_attention as gpu
from pallas_kernels.reference import ragged_paged_attention_reference
from tests.scripts import load_script

bench_kernels = load_script("bench_kernels")


def test_engine_decode_buckets():
    got = {n: bench_kernels.engine_decode_buckets(n) for n in (1, 3, 16, 17, 33, 64, 65, 200)}
    assert got == {
        1: (16, 16),
        3: (16, 16),
        16: (16, 16),
        17: (32, 32),
        33: (64, 64),
        64: (64, 64),
        65: (128, 128),
        200: (256, 256),
    }
    # The batch of 3 runs the 16-request bucket's tiles, not those of 3 requests alone.
    assert gpu.default_config(16, 16, 32, 8, 16) != gpu.default_config(3, 3, 32, 8, 16)


def test_padded_batch_matches_the_reference():
    lens = [40, 40, 40]
    buckets = bench_kernels.engine_decode_buckets(len(lens))
    (padded, *_) = bench_kernels.make_inputs([1] * 3, lens, 16, buckets=buckets)
    q, kv_cache, kv_lens, page_table, query_start, num_seqs = padded
    assert q.shape[0] == 16 and kv_lens.shape == (16,) and page_table.shape[0] == 16
    assert int(num_seqs[0]) == 3 and list(np.asarray(kv_lens)) == [*lens, *[0] * 13]
    assert list(np.asarray(query_start)) == [0, 1, 2, *[3] * 14]
    scale = bench_kernels.HEAD_DIM**-0.5
    got = np.asarray(
        gpu.ragged_paged_attention(*padded, sm_scale=scale, interpret=True), np.float32
    )
    ref = np.asarray(ragged_paged_attention_reference(*padded, sm_scale=scale), np.float32)
    np.testing.assert_allclose(got, ref, atol=2e-2, rtol=2e-2)
    assert not got[3:].any()  # the padding rows are zero, as the reference says
    (plain, *_) = bench_kernels.make_inputs([1] * 3, lens, 16)  # unpadded: as before
    assert plain[0].shape[0] == 3 and int(plain[5][0]) == 3
