"""Sampler tests against numpy references (vLLM semantics) on small fixed logits."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from engine.sampler import (
    SamplingTensors,
    _pick,
    apply_token_bitmask,
    categorical,
    filter_logits,
    process_logits,
    request_keys,
    sample,
)

V = 64  # small vocabulary: every test compiles in well under a second
jit_sample = jax.jit(sample, static_argnames=("num_logprobs", "top_k_cap"))
jit_process = jax.jit(process_logits)
jit_filter = jax.jit(filter_logits, static_argnames=("top_k_cap",))


def make_params(**overrides: Any) -> SimpleNamespace:
    """A SamplingParams stand-in with vLLM's attribute names and defaults."""
    fields = dict(
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        seed=None,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        logit_bias=None,
        min_tokens=0,
        stop_token_ids=None,
        ignore_eos=False,
        logprobs=None,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def build(params: list[SimpleNamespace], num_rows: int, **kwargs: Any) -> SamplingTensors:
    n = len(params)
    kwargs.setdefault("prompt_token_ids", [[]] * n)
    kwargs.setdefault("output_token_ids", [[]] * n)
    return SamplingTensors.from_params(params, vocab_size=V, num_rows=num_rows, **kwargs)


def fixed_logits(num_rows: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((num_rows, V)) * scale).astype(np.float32)


# ---- numpy references (written from vLLM's torch code, independently of engine/sampler.py) ----


def ref_top_k_top_p(logits: np.ndarray, k: int, p: float) -> np.ndarray:
    """vLLM apply_top_k_top_p on one row (float64): ascending sort, cumsum <= 1 - p dropped."""
    order = np.argsort(logits, kind="stable")
    srt = logits[order].astype(np.float64)
    if k > 0:
        srt = np.where(srt < srt[len(srt) - k], -np.inf, srt)
    if p < 1:
        probs = np.exp(srt - srt.max())
        cum = np.cumsum(probs / probs.sum())
        drop = cum <= 1 - p
        drop[-1] = False
        srt = np.where(drop, -np.inf, srt)
    out = np.empty_like(srt)
    out[order] = srt
    return out


def ref_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    probs = np.exp(logits - logits.max())
    return np.where(probs < min_p * probs.max(), -np.inf, logits)


def ref_probs(logits: np.ndarray, temp: float, k: int, p: float, min_p: float) -> np.ndarray:
    x = ref_min_p(ref_top_k_top_p(logits.astype(np.float64) / temp, k, p), min_p)
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---- tests ----


def test_greedy_is_argmax_and_costs_no_keys() -> None:
    logits = fixed_logits(8, seed=1)
    tensors = build([make_params(temperature=0.0)] * 5, num_rows=8)
    out = jit_sample(jnp.asarray(logits), tensors)
    np.testing.assert_array_equal(np.asarray(out.sampled_ids), logits.argmax(-1))
    assert out.sampled_logprobs is None and out.top_ids is None


def test_greedy_rows_in_a_sampling_batch_stay_argmax() -> None:
    logits = fixed_logits(8, seed=2)
    params = [make_params(temperature=0.0, top_p=0.5), make_params(temperature=1.0, top_k=3)] * 4
    out = jit_sample(jnp.asarray(logits), build(params, num_rows=8, seeds=list(range(8))))
    ids = np.asarray(out.sampled_ids)
    np.testing.assert_array_equal(ids[0::2], logits[0::2].argmax(-1))
    for row in range(1, 8, 2):
        assert ids[row] in np.argsort(logits[row])[-3:]


def test_process_logits_matches_numpy_bias_ban_penalties() -> None:
    rng = np.random.default_rng(3)
    logits = fixed_logits(4, seed=3)
    prompts = [rng.integers(0, V, 10).tolist() for _ in range(3)]
    outputs = [rng.integers(0, V, 12).tolist() for _ in range(3)]
    params = [
        make_params(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7),
        make_params(logit_bias={5: 3.0, 17: -2.5, 60: 100.0}, repetition_penalty=0.8),
        make_params(min_tokens=20, stop_token_ids=[9], presence_penalty=-0.5),
    ]
    tensors = build(
        params, 4, prompt_token_ids=prompts, output_token_ids=outputs, eos_token_ids=[2]
    )
    got = np.asarray(jit_process(jnp.asarray(logits), tensors))

    want = logits.copy()
    for i, p in enumerate(params):
        for tok, bias in (p.logit_bias or {}).items():
            want[i, tok] += np.float32(bias)
        counts = np.bincount(outputs[i], minlength=V).astype(np.float32)
        seen = (counts > 0) | np.isin(np.arange(V), prompts[i])
        rep = np.float32(p.repetition_penalty)
        row = want[i]
        row = np.where(seen, np.where(row > 0, row / rep, row * rep), row)
        row = row - np.float32(p.frequency_penalty) * counts
        want[i] = row - np.float32(p.presence_penalty) * (counts > 0).astype(np.float32)
    want[2, [2, 9]] = -np.inf  # min_tokens not reached: EOS and stop ids banned
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got[3], logits[3])  # padding row untouched


def test_filter_logits_keeps_exactly_the_reference_set() -> None:
    logits = fixed_logits(8, seed=4, scale=1.0)
    top_k = np.array([0, 5, 0, 12, 3, 0, 40, 0], np.int32)
    top_p = np.array([1.0, 1.0, 0.7, 0.9, 0.95, 0.99, 0.5, 1.0], np.float32)
    min_p = np.array([0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.05, 0.3], np.float32)
    # cap 8 forces the exact full-vocabulary fallback (top_k 12/40 and wide nuclei); cap 64 = V.
    for cap in (8, 64):
        got = np.asarray(jit_filter(logits, top_k, top_p, min_p, top_k_cap=cap))
        for i in range(8):
            want = ref_min_p(ref_top_k_top_p(logits[i], top_k[i], top_p[i]), min_p[i])
            np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want), f"row {i}")


def test_sampling_distribution_matches_reference_chi_square() -> None:
    configs = [  # (temperature, top_k, top_p, min_p)
        (1.0, 0, 1.0, 0.0),
        (0.7, 8, 1.0, 0.0),
        (1.3, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.08),
        (0.9, 20, 0.9, 0.02),
    ]
    draws = 2048
    base = fixed_logits(1, seed=5, scale=1.5)[0]
    params = [
        make_params(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in configs
    ] * draws
    order = np.arange(len(params)) % len(configs)  # row r uses config r % 5
    tensors = build(params, num_rows=len(params), seeds=list(range(len(params))))
    logits = np.broadcast_to(base, (len(params), V))
    ids = np.asarray(jit_sample(jnp.asarray(logits), tensors).sampled_ids)
    for c, (t, k, p, m) in enumerate(configs):
        probs = ref_probs(base, t, k, p, m)
        counts = np.bincount(ids[order == c], minlength=V)
        assert counts[probs == 0].sum() == 0, f"config {c} emitted an excluded token"
        expected = probs * draws
        # Pool bins with < 5 expected draws so the chi-square approximation holds.
        small = (expected < 5) & (probs > 0)
        obs = np.append(counts[expected >= 5], counts[small].sum())
        exp = np.append(expected[expected >= 5], expected[small].sum())
        keep = exp > 0
        p_value = stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue
        assert p_value > 1e-3, f"config {c}: p = {p_value}"


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_k() -> None:
    logits = fixed_logits(8, seed=6)
    params = [make_params(temperature=1.0, top_k=4, logit_bias={0: 50.0})] * 8
    tensors = build(params, 8, seeds=list(range(8)))
    out = jit_sample(jnp.asarray(logits), tensors, num_logprobs=5)
    ref = ref_log_softmax(logits)  # raw: before bias / top-k
    ids = np.asarray(out.sampled_ids)
    rows = np.arange(8)
    np.testing.assert_allclose(np.asarray(out.sampled_logprobs), ref[rows, ids], atol=1e-5)
    ranks = (ref >= ref[rows, ids][:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.sampled_ranks), ranks)
    np.testing.assert_array_equal(np.asarray(out.top_ids), np.argsort(-ref, axis=-1)[:, :5])
    np.testing.assert_allclose(
        np.asarray(out.top_logprobs), np.sort(ref)[:, ::-1][:, :5], atol=1e-5
    )
    assert (ids == 0).all()  # the +50 bias did apply to sampling


def test_seeded_rows_reproduce_across_batch_composition_and_position() -> None:
    probe_logits = fixed_logits(1, seed=7, scale=0.5)[0]  # flat: many tokens are plausible
    probe = make_params(temperature=1.0, top_p=0.95)
    others_a = [make_params(temperature=0.0)] * 7
    others_b = [make_params(temperature=0.8, top_k=3, min_p=0.1)] * 7
    seen = []
    for seed in range(12):
        results = []
        for others, pos in ((others_a, 0), (others_b, 5)):
            params = others[:pos] + [probe] + others[pos:]
            probe_seed = seed * 7919
            seeds = [probe_seed if j == pos else 1000 + j + 31 * pos for j in range(8)]
            logits = fixed_logits(8, seed=100 + pos)
            logits[pos] = probe_logits
            out = jit_sample(jnp.asarray(logits), build(params, 8, seeds=seeds))
            results.append(int(out.sampled_ids[pos]))
        assert results[0] == results[1], f"seed {seed}: {results}"
        seen.append(results[0])
    assert len(set(seen)) > 3, "different seeds should draw different tokens"


def test_request_keys_depend_on_seed_and_step_only() -> None:
    keys = np.asarray(request_keys(jnp.array([1, 1, 2, 1], jnp.uint32), jnp.array([0, 3, 0, 0])))
    assert keys.shape == (4, 2) and keys.dtype == np.uint32
    np.testing.assert_array_equal(keys[0], keys[3])
    assert len({tuple(k) for k in keys[:3]}) == 3


def test_banned_ids_never_sampled() -> None:
    logits = np.tile(fixed_logits(1, seed=8)[0], (256, 1))
    logits[:, [3, 4]] = 20.0  # overwhelmingly likely unless banned
    params = [make_params(min_tokens=5, stop_token_ids=[4])] * 255 + [make_params(temperature=0.0)]
    outputs = [[]] * 255 + [[1, 1, 1, 1, 1]]
    tensors = build(params, 256, eos_token_ids=[3], output_token_ids=outputs, seeds=range(256))
    ids = np.asarray(jit_sample(jnp.asarray(logits), tensors).sampled_ids)
    assert not np.isin(ids[:255], [3, 4]).any()
    assert ids[255] in (3, 4)  # no ban for params without min_tokens


def test_token_bitmask_respected() -> None:
    rng = np.random.default_rng(9)
    allowed = rng.random((256, V)) < 0.2
    allowed[:, 0] = True
    # Word i // 32, bit i % 32 (LSB first) = id i, as xgrammar / llguidance pack it.
    bits = allowed.reshape(256, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    bitmask = bits.sum(-1).astype(np.uint32).view(np.int32)
    logits = fixed_logits(256, seed=9)
    np.testing.assert_array_equal(
        np.isfinite(np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))),
        allowed,
    )
    params = [make_params(temperature=1.5)] * 128 + [make_params(temperature=0.0)] * 128
    tensors = build(params, 256, seeds=range(256), token_bitmask=bitmask)
    ids = np.asarray(jit_sample(jnp.asarray(logits), tensors).sampled_ids)
    assert allowed[np.arange(256), ids].all()
    masked = np.where(allowed, logits, -np.inf)
    np.testing.assert_array_equal(ids[128:], masked[128:].argmax(-1))


def test_from_params_pads_and_normalises() -> None:
    params = [
        make_params(top_k=-1, top_p=0.9, temperature=1e-6, seed=42, logit_bias={7: 1.0}),
        make_params(top_k=100, min_tokens=2, stop_token_ids=[5, 6], ignore_eos=True),
    ]
    tensors = build(params, 4, output_token_ids=[[1, 1, 3], [2]], eos_token_ids=[0])
    np.testing.assert_array_equal(tensors.temperature, [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(tensors.top_k, [0, 0, 0, 0])  # -1 and k >= V mean off
    np.testing.assert_array_equal(tensors.logit_bias_ids[:, 0], [7, -1, -1, -1])
    np.testing.assert_array_equal(tensors.banned_ids, [[-1, -1], [5, 6], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(tensors.output_token_counts[0, :4], [0, 2, 0, 1])
    want_key = request_keys(jnp.array([42], jnp.uint32), jnp.array([3]))
    np.testing.assert_array_equal(tensors.keys[0], np.asarray(want_key)[0])


def test_static_feature_variants_match_the_full_sampler():
    """Pruned samplers (SamplerFeatures) draw exactly what the full one draws for batches
    that don't use the pruned parts."""
    import jax
    import jax.numpy as jnp

    from engine.sampler import ALL_FEATURES, GREEDY_ONLY, SamplerFeatures, SamplingTensors, sample

    v, rows = 50, 6
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(rows, v)) * 3, jnp.float32)

    class P:  # SamplingParams-like
        def __init__(self, temperature, min_p=0.0):
            self.temperature, self.top_p, self.top_k, self.min_p = temperature, 1.0, 0, min_p
            self.presence_penalty = self.frequency_penalty = 0.0
            self.repetition_penalty, self.seed, self.logit_bias = 1.0, 11, None
            self.min_tokens, self.stop_token_ids, self.ignore_eos = 0, (), False

    def run(params, features):
        t = SamplingTensors.from_params(
            params,
            vocab_size=v,
            num_rows=rows,
            prompt_token_ids=[[1]] * len(params),
            output_token_ids=[[]] * len(params),
        )
        t = jax.tree.map(jnp.asarray, t)
        return np.asarray(
            jax.jit(lambda lg, tt: sample(lg, tt, features=features).sampled_ids)(logits, t)
        )

    greedy = [P(0.0)] * rows
    np.testing.assert_array_equal(run(greedy, GREEDY_ONLY), run(greedy, ALL_FEATURES))
    np.testing.assert_array_equal(run(greedy, GREEDY_ONLY), np.argmax(np.asarray(logits), -1))
    mixed = [P(0.7), P(0.0), P(1.3, min_p=0.2)] * 2
    no_sort = SamplerFeatures(random=True, sort=False, penalties=False)
    np.testing.assert_array_equal(run(mixed, no_sort), run(mixed, ALL_FEATURES))


def test_inverse_cdf_draw_matches_softmax_across_blocks() -> None:
    """`categorical` with blocks of 4 ids over 10 (the last block padded): the drawn frequencies
    follow softmax, excluded ids (-inf) never come, and mass in one block only is found."""
    rng = np.random.default_rng(11)
    cases = [rng.normal(size=10).astype(np.float32) for _ in range(2)]
    cases[1][[0, 3, 4, 9]] = -np.inf  # excluded ids, in the first, middle and last block
    last_only = np.full(10, -np.inf, np.float32)
    last_only[[8, 9]] = [0.0, 1.0]  # all the mass in the padded last block
    first_only = np.full(10, -np.inf, np.float32)
    first_only[0] = 3.0
    draws = 4000
    draw = jax.jit(lambda k, x: categorical(k, x, block=4))
    for row in [*cases, last_only, first_only]:
        logits = jnp.asarray(np.tile(row, (draws, 1)))
        keys = jax.random.key_data(
            jax.vmap(lambda i: jax.random.key(i, impl="threefry2x32"))(jnp.arange(draws))
        )
        ids = np.asarray(draw(keys, logits))
        probs = np.exp(row.astype(np.float64) - row.max())
        probs /= probs.sum()
        counts = np.bincount(ids, minlength=10)
        assert len(counts) == 10 and counts[probs == 0].sum() == 0
        live = probs > 0
        if live.sum() > 1:
            expected = probs[live] / probs[live].sum() * counts.sum()
            p_value = stats.chisquare(counts[live], expected).pvalue
            assert p_value > 1e-3, (row, counts, p_value)
        else:
            assert counts[live][0] == draws


def test_inverse_cdf_never_picks_a_zero_weight_entry() -> None:
    """A parallel cumsum need not be flat across an excluded id: the pick skips zero weights,
    and where rounding puts u * total past the end it takes the last positive entry."""
    weights = jnp.asarray([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    cdf = jnp.asarray([[1.0, 1.0000002, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]])  # row 0: not flat
    u = jnp.asarray([0.50000006, 1.0])  # row 0: u * 2 = 1.0000001, inside the step; row 1: end
    np.testing.assert_array_equal(np.asarray(_pick(cdf, weights, u)), [2, 2])
