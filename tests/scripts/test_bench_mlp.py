"""`scripts/bench_mlp.py` on the CPU, shrunk. `--sustained`: the chained executable's scalar is
the sum it claims (numpy), each config gets one time a round, and a config that fails to
compile is skipped instead of ending the sweep. `--data`: each data set's distribution."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

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


def test_operands_have_each_data_sets_distribution():
    """`--data`: normal operands, vLLM's dummy draw (U(-1e-3, 1e-3) weights; x a normal row
    times a U(-1e-3, 1e-3) norm scale per column), zero activations."""
    bench = load_script("bench_mlp")
    k, two_f = 256, 512

    def both(data):
        x, w = bench.activations(data, (64, k)), bench.weights(data, k, two_f)
        return np.asarray(x, np.float32), np.asarray(w, np.float32)

    x, w = both("normal")
    assert abs(x.std() - 1) < 0.05 and abs(w.std() * np.sqrt(k) - 1) < 0.05
    x, w = both("vllm")
    assert np.abs(w).max() <= 1e-3 and abs(w.std() - 1e-3 / np.sqrt(3)) < 2e-5
    scale = np.abs(x).max(axis=0) / np.abs(x).max()  # one scale a column: columns differ
    assert np.abs(x).max() < 5e-3 and scale.min() < 0.1
    x, w = both("zeros")
    assert not x.any() and abs(w.std() * np.sqrt(k) - 1) < 0.05
    with pytest.raises(ValueError):
        bench.activations("ones", (64, k))
