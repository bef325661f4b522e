"""`scripts/bench_kernels.py --engine-buckets`: a decode batch padded as the engine pads a step
(its token and request buckets, `num_seqs` the real requests) is one the kernel serves (the
Triton kernel in interpret mode against the jnp reference, on the real rows), and its bucket
picks the engine's tiles, not the unpadded batch's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from pallas_kernels import gpu_ragged_paged_attention as gpu
from pallas_kernels.reference import ragged_paged_attention_reference

SCRIPT = Path(__file__).parents[2] / "scripts" / "bench_kernels.py"
spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
bench_kernels = importlib.util.module_from_spec(spec)
sys.modules["bench_kernels"] = bench_kernels  # its dataclasses look their module up
spec.loader.exec_module(bench_kernels)


def test_engine_buckets_pad_the_batch_and_keep_its_rows():
    lens = [40, 40, 40]
    (plain, *_) = bench_kernels.make_inputs([1] * 3, lens, 16)
    (padded, *_) = bench_kernels.make_inputs([1] * 3, lens, 16, buckets=(16, 8))
    q, kv_cache, kv_lens, page_table, query_start, num_seqs = padded
    assert q.shape[0] == 16 and kv_lens.shape == (8,) and page_table.shape[0] == 8
    assert int(num_seqs[0]) == 3 and list(np.asarray(kv_lens)) == [*lens, 0, 0, 0, 0, 0]
    assert list(np.asarray(query_start)) == [0, 1, 2, 3, 3, 3, 3, 3, 3]
    # The engine's 8-request bucket: 4 splits (128 keys); the unpadded 3 requests: 8.
    assert gpu.default_config(16, 8, 32, 8, 16).num_splits == 4
    assert gpu.default_config(3, 3, 32, 8, 16).num_splits == 8
    scale = bench_kernels.HEAD_DIM**-0.5
    got = gpu.ragged_paged_attention(*padded, sm_scale=scale, interpret=True)
    ref = ragged_paged_attention_reference(*padded, sm_scale=scale)
    np.testing.assert_allclose(  # the real rows; the padding rows are never written
        np.asarray(got[:3], np.float32), np.asarray(ref[:3], np.float32), atol=2e-2, rtol=2e-2
    )
    assert plain[0].shape[0] == 3 and int(plain[5][0]) == 3  # unpadded: as before
