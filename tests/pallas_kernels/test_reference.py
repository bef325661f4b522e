"""The jnp reference against a plain numpy loop over requests, tokens and heads."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import (
    kv_cache_shape,
    ragged_paged_attention_reference,
    write_kv_reference,
)
from tests.pallas_kernels.ragged_batches import make_batch


def _numpy_attention(q, kv_cache, kv_lens, page_table, query_start, num_seqs, scale, window, cap):
    """q: [T, N, H] -> [T, N, H]: each request's context gathered page by page."""
    q, kv_cache = np.asarray(q, np.float64), np.asarray(kv_cache, np.float64)
    _, num_kv_heads, _, page_size, _ = kv_cache.shape
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    for r in range(num_seqs):
        kv_len = int(kv_lens[r])
        pages = page_table[r, : -(-kv_len // page_size)]
        keys = np.concatenate([kv_cache[0, :, p] for p in pages], axis=1)[:, :kv_len]  # [K, L, H]
        values = np.concatenate([kv_cache[1, :, p] for p in pages], axis=1)[:, :kv_len]
        q_len = query_start[r + 1] - query_start[r]
        for i in range(q_len):
            t, pos = query_start[r] + i, kv_len - q_len + i
            first = 0 if window is None else max(0, pos - window + 1)
            for n in range(q.shape[1]):
                s = keys[n // group, first : pos + 1] @ q[t, n] * scale
                if cap is not None:
                    s = cap * np.tanh(s / cap)
                p = np.exp(s - s.max())
                out[t, n] = p @ values[n // group, first : pos + 1] / p.sum()
    return out


@pytest.mark.parametrize(
    ("q_lens", "kv_lens", "heads", "window", "cap"),
    [
        ([1, 1, 1], [3, 17, 9], (4, 4), None, None),  # decode
        ([6, 11], [6, 11], (4, 2), None, None),  # prefill
        ([1, 5, 2], [10, 21, 2], (8, 1), 4, None),  # chunked prefill, window
        ([3, 1], [12, 30], (4, 2), None, 2.5),  # soft cap
    ],
)
def test_reference_matches_numpy_loop(q_lens, kv_lens, heads, window, cap):
    b = make_batch(
        7,
        q_lens,
        kv_lens,
        num_tokens=sum(q_lens) + 3,
        num_requests=len(q_lens) + 2,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=16,
        page_size=4,
        pages_per_request=8,
    )
    m = b.meta
    kv_cache = write_kv_reference(b.kv_cache, b.k, b.v, m.slot_ids)
    out = ragged_paged_attention_reference(
        b.q,
        kv_cache,
        m.kv_lens,
        m.page_table,
        m.query_start,
        m.num_seqs,
        sm_scale=0.3,
        sliding_window=window,
        soft_cap=cap,
    )
    expected = _numpy_attention(
        b.q,
        kv_cache,
        np.asarray(m.kv_lens),
        np.asarray(m.page_table),
        np.asarray(m.query_start),
        len(q_lens),
        0.3,
        window,
        cap,
    )
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


def test_write_kv_reference_places_tokens_at_slots():
    cache = jnp.zeros(kv_cache_shape(num_pages=4, page_size=2, num_kv_heads=3, head_dim=5))
    k = np.arange(1, 4 * 3 * 5 + 1, dtype=np.float32).reshape(4, 3, 5)
    v = -k
    slots = jnp.array([5, 2, 0, 0])  # two padding tokens: page 0, never written
    out = np.asarray(write_kv_reference(cache, jnp.asarray(k), jnp.asarray(v), slots))
    np.testing.assert_array_equal(out[0, :, 2, 1], k[0])  # slot 5 = page 2, offset 1
    np.testing.assert_array_equal(out[1, :, 1, 0], v[1])  # slot 2 = page 1, offset 0
    assert np.count_nonzero(out) == np.count_nonzero(k[:2]) + np.count_nonzero(v[:2])
