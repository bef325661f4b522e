"""`scripts/bench_mlp.py --sustained` on the CPU, shrunk: the chained executable's scalar is the
sum it claims (numpy), each config gets one time a round, and a config that fails to compile
is skipped instead of ending the sweep."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tests.scripts import load_script


def test_chained_sums_the_first_element_of_each_call():
    bench = load_script("bench_mlp")
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((3, 4, 8)).astype(np.float32)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    got = bench.chained(lambda x, w: jnp.tanh(x @ w), 3)(xs, w)
    want = sum(np.tanh(xs[i] @ w)[0, 0] for i in range(3))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_sustained_times_each_config_per_round_and_skips_failures():
    bench = load_script("bench_mlp")
    xs = jnp.ones((2, 4, 8), jnp.float32)
    w = jnp.ones((8, 6), jnp.float32)

    def broken(x, w):
        raise ValueError("does not lower")

    us = bench.sustained_us(
        {"matmul": lambda x, w: x @ w, "broken": broken}, xs, w, seconds=0.01, rounds=2
    )
    assert list(us) == ["matmul"]
    assert len(us["matmul"]) == 2 and all(t > 0 for t in us["matmul"])
