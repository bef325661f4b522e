"""RoPE in the models' q/k layout (pallas_kernels/rope.py) against HF's rotate-half RoPE in
numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.rope import apply_rope, deinterleave_rope_pairs, interleave_rope_pairs


def test_rope_pairs_interleave_and_back():
    x = np.arange(2 * 24).reshape(2, 24)  # three heads of 8
    y = interleave_rope_pairs(x, 8)
    np.testing.assert_array_equal(y[0, :8], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(deinterleave_rope_pairs(y, 8), x)
    np.testing.assert_array_equal(np.asarray(interleave_rope_pairs(jnp.asarray(x), 8)), y)


def test_apply_rope_is_hf_rope_in_the_interleaved_layout():
    """HF: x * cos + rotate_half(x) * sin with cos/sin of [angles, angles] over the head; on
    heads arranged by `interleave_rope_pairs`, `apply_rope` gives the same values, arranged
    the same way; dot products of two rotated heads are unchanged by the arrangement."""
    rng = np.random.default_rng(0)
    t, heads, h = 5, 3, 16
    x = rng.normal(size=(t, heads, h)).astype(np.float32)
    positions = rng.integers(0, 4000, size=t).astype(np.int32)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, h, 2) / h)).astype(np.float32)
    angles = (positions.astype(np.float32)[:, None] * inv_freq).astype(np.float64)  # as HF
    cos = np.concatenate([np.cos(angles)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(angles)] * 2, -1)[:, None]
    rotate_half = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1)
    hf = x * cos + rotate_half * sin
    got = apply_rope(jnp.asarray(interleave_rope_pairs(x, h)), jnp.asarray(positions), inv_freq)
    np.testing.assert_allclose(deinterleave_rope_pairs(np.asarray(got), h), hf, atol=1e-5)
    scores = np.einsum("thd,shd->hts", np.asarray(got), np.asarray(got))
    np.testing.assert_allclose(scores, np.einsum("thd,shd->hts", hf, hf), rtol=1e-4, atol=1e-4)
