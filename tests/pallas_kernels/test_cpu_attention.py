"""The blocked CPU attention against the readable reference on random ragged batches."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cpu_attention import ragged_paged_attention_blocked
from pallas_kernels.reference import ragged_paged_attention_reference
from tests.pallas_kernels.ragged_batches import kernel_args, make_batch


@pytest.mark.parametrize(
    ("q_lens", "kv_lens", "heads", "window", "cap", "ppb"),
    [
        ([1, 1, 1, 1], [3, 70, 9, 130], (4, 4), None, None, 2),  # decode, several blocks
        ([6, 40], [6, 40], (4, 2), None, None, 8),  # prefill
        ([1, 20, 2], [10, 61, 2], (8, 1), 5, None, 1),  # chunked prefill, window
        ([3, 1], [12, 100], (4, 2), None, 2.5, 3),  # soft cap, P not a multiple of ppb
        ([5], [5], (4, 2), None, None, 4),  # one request; padding tokens and requests
    ],
)
def test_blocked_matches_reference(q_lens, kv_lens, heads, window, cap, ppb):
    n, k = heads
    b = make_batch(
        sum(kv_lens),
        q_lens,
        kv_lens,
        num_tokens=sum(q_lens) + 3,
        num_requests=len(q_lens) + 2,
        num_heads=n,
        num_kv_heads=k,
        head_dim=16,
        page_size=8,
        pages_per_request=17,
    )
    args = kernel_args(b)
    kw = dict(sm_scale=0.25, sliding_window=window, soft_cap=cap)
    want = ragged_paged_attention_reference(*args, **kw)
    got = ragged_paged_attention_blocked(*args, **kw, pages_per_block=ppb)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(got)[sum(q_lens) :] == 0), "padding tokens must be zero"
    assert got.dtype == jnp.float32
