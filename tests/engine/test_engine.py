"""The whole engine on a tiny random Llama, against transformers (torch, CPU) as the truth."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.llm_engine import StepTrace
from engine.outputs import OutputKind, merge_deltas
from engine.types import SchedulerOutput
from tests.hf_models import hf_greedy, write_checkpoint

ENGINE_ARGS = dict(
    skip_tokenizer_init=True,
    page_size=8,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_model_len=512,
    token_buckets=(16, 64),
    dtype="float32",
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint("llama3", tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def llm(folder, cache_dir):
    return LLM(str(folder), num_pages=128, compilation_cache_dir=cache_dir, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def prompts():
    """16 prompts of lengths 1..300; the last six share prefixes with earlier ones."""
    rng = np.random.default_rng(0)
    lengths = [1, 2, 7, 8, 9, 31, 64, 100, 150, 300]
    out = [rng.integers(3, 320, size=n).tolist() for n in lengths]
    out += [out[7][:80] + rng.integers(3, 320, size=n).tolist() for n in (5, 40, 90)]
    out += [out[9][:200] + rng.integers(3, 320, size=n).tolist() for n in (1, 17, 64)]
    return out


@pytest.fixture(scope="module")
def expected(folder, prompts):
    return [hf_greedy(folder, p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_transformers_under_preemption(
    folder, cache_dir, prompts, expected, prefix_caching
):
    """All 16 prompts at once in a KV cache of 48 pages (384 tokens), admitted whenever their
    chunk fits (no admission reserve): the scheduler must chunk prefills and preempt, and every
    output must still equal transformers' greedy."""
    llm = LLM(
        str(folder),
        num_pages=48,
        admission_horizon=0,
        enable_prefix_caching=prefix_caching,
        compilation_cache_dir=cache_dir,
        **ENGINE_ARGS,
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0, "the KV budget should force preemption"
    for out, want in zip(outs, expected, strict=True):
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.allocator.num_free_pages == llm.engine.allocator.num_usable_pages


def test_staggered_arrivals_and_prefix_cache(folder, cache_dir, prompts, expected):
    """Requests join while others decode; shared prefixes are computed once."""
    llm = LLM(
        str(folder),
        num_pages=256,
        enable_prefix_caching=True,
        compilation_cache_dir=cache_dir,
        **ENGINE_ARGS,
    )
    eng = llm.engine
    pending = list(enumerate(prompts))
    done = {}
    while pending or eng.has_unfinished_requests():
        for _ in range(2):  # two new requests per step
            if pending:
                i, p = pending.pop(0)
                eng.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
        for out in eng.step():
            if out.finished:
                done[int(out.request_id)] = out
    for i, want in enumerate(expected):
        assert done[i].outputs[0].token_ids == want, i
    # Prompts 10-15 share 80 or 200 tokens with earlier ones: whole pages come from the cache.
    assert sum(done[i].num_cached_tokens for i in range(10, 16)) >= 3 * 80 + 3 * 200 - 6 * 8
    assert eng.scheduler.num_cached_tokens > 0


def test_no_compilation_after_startup(llm, folder, prompts):
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: events.append(name) if "compile" in name else None
    )
    params = [
        SamplingParams(temperature=0.0, max_tokens=5),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1, max_tokens=7, logprobs=3),
        SamplingParams(
            temperature=1.0,
            min_p=0.1,
            presence_penalty=0.5,
            repetition_penalty=1.2,
            logit_bias={5: 3.0},
            min_tokens=2,
            max_tokens=4,
            prompt_logprobs=2,
        ),
    ]
    llm.generate([{"prompt_token_ids": p} for p in prompts[:9]], [params[i % 3] for i in range(9)])
    assert events == []


def test_seeded_sampling_reproduces_regardless_of_batch(llm, folder, prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[5]}, seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts[:8]]
    outs = llm.generate(batch, [seeded if i == 5 else others for i in range(8)])
    assert outs[5].outputs[0].token_ids == alone
    n3 = llm.generate(
        {"prompt_token_ids": prompts[5]},
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
    )[0]
    assert [c.index for c in n3.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in n3.outputs}) == 3, "n=3 should differ"


def test_streamed_deltas_merge_into_the_final_output(llm, prompts):
    """`merge_deltas` over a request's streamed deltas gives its final output (n=2, seeded,
    with logprobs and prompt logprobs), as the server's merged chunks rely on."""
    params = SamplingParams(
        n=2, temperature=1.0, seed=5, max_tokens=9, logprobs=2, prompt_logprobs=1,
        ignore_eos=True,
    )  # fmt: skip
    prompt = {"prompt_token_ids": prompts[7]}
    final = llm.generate(prompt, params)[0]
    engine = llm.engine
    engine.add_request("streamed", prompt, params)
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step(kind=OutputKind.DELTA)
    assert len(deltas) >= 9 and all(d.request_id == "streamed" for d in deltas)
    merged = functools.reduce(merge_deltas, deltas)
    assert merged.finished and merged.prompt_logprobs == final.prompt_logprobs
    assert sorted(merged.outputs, key=lambda c: c.index) == final.outputs


def _traced_llm(folder, cache_dir, trace, **kwargs) -> LLM:
    """The tiny engine, writing its step trace to `trace`."""
    return LLM(
        str(folder),
        num_pages=128,
        compilation_cache_dir=cache_dir,
        step_trace_path=str(trace),
        **ENGINE_ARGS,
        **kwargs,
    )


def test_step_trace_accounts_for_every_token(folder, cache_dir, prompts, tmp_path):
    """`step_trace_path`: one JSON line per step, whose scheduled tokens add up to every prompt
    token plus every output token but the last (each is fed back once), within its bucket."""
    trace = tmp_path / "steps.jsonl"
    traced = _traced_llm(folder, cache_dir, trace, enable_prefix_caching=False)
    batch = prompts[:8]  # 222 prompt tokens: steps of 64 take them in chunks
    outs = traced.generate([{"prompt_token_ids": p} for p in batch], GREEDY)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    want = sum(len(p) for p in batch) + sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    assert sum(line["tokens"] for line in lines) == want
    assert all(line["tokens"] <= line["bucket"] for line in lines)
    assert all(line["wait_ms"] >= 0 and line["requests"] <= 8 for line in lines)
    # Each prompt starts in one step and ends (samples its first token) in the same or a
    # later one, named by its arrival time.
    starts = {a: i for i, line in enumerate(lines) for a in line["prompt_starts"]}
    ends = {a: i for i, line in enumerate(lines) for a in line["prompt_ends"]}
    assert len(starts) == len(batch) and starts.keys() == ends.keys()
    assert all(starts[a] <= ends[a] for a in starts)
    assert any(starts[a] < ends[a] for a in starts)  # the 100-token prompt spans steps
    assert sum(len(line["prompt_starts"]) for line in lines) == len(batch)


def test_step_trace_names_prompts_that_hit_the_prefix_cache(folder, cache_dir, prompts, tmp_path):
    """A prompt whose first 80 tokens are cached starts computing at position 80: the trace
    still names it (by arrival time) in the step where it starts and where it ends, which is
    how `step_trace_summary.py --ttft` ties client requests to steps."""
    trace = tmp_path / "steps.jsonl"
    traced = _traced_llm(folder, cache_dir, trace)
    for prompt in (prompts[7], prompts[10]):  # 100 tokens; then its first 80 and 5 more
        traced.generate({"prompt_token_ids": prompt}, GREEDY)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    starts = [(a, i) for i, line in enumerate(lines) for a in line["prompt_starts"]]
    ends = [a for line in lines for a in line["prompt_ends"]]
    assert [a for a, _ in starts] == ends and len(ends) == 2 and ends[0] < ends[1]
    assert lines[starts[1][1]]["prefill_tokens"] == len(prompts[10]) - 80


def test_step_trace_is_readable_during_a_busy_run(tmp_path):
    """A run that never idles still shows its steps within a second or so: the trace flushes
    at least once a second of steps, not only when the engine idles or exits."""
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(str(path))
    busy = SchedulerOutput(requests=(), num_batched_tokens=16)
    t = time.perf_counter()
    for k in range(3):  # 3 steps within the first second: nothing readable yet
        trace.record(busy, 16, (t + 0.1 * k, *[t + 0.1 * k] * 4), 0, {})
    assert path.read_text() == ""
    trace.record(busy, 16, (t + 1.1, *[t + 1.1] * 4), 0, {})
    assert len(path.read_text().splitlines()) == 4


def test_the_runner_guards_its_wait_for_every_step(llm, prompts, monkeypatch):
    """The runner waits for each step inside its watchdog's guard (`engine.watchdog`, on an
    accelerator mesh, where a failed device leaves the rest waiting for ever): one guarded wait
    per step, whose tokens add up to the prompt (less its cached prefix) and every output token
    but the last.
    (test_watchdog.py shows that a guarded call past its deadline ends the process.)"""
    guarded = []
    recorder = SimpleNamespace(guard=lambda what: guarded.append(what) or contextlib.nullcontext())
    monkeypatch.setattr(llm.engine.runner, "watchdog", recorder)
    result = llm.generate({"prompt_token_ids": prompts[7]}, GREEDY)[0]
    tokens = [int(what.removeprefix("a step of ").removesuffix(" tokens")) for what in guarded]
    computed = len(prompts[7]) - result.num_cached_tokens  # earlier tests cached some of it
    assert sum(tokens) == computed + len(result.outputs[0].token_ids) - 1 and len(tokens) > 1


def test_a_watchdog_exit_flushes_the_step_trace_first(folder, cache_dir, tmp_path, monkeypatch):
    """Where the runner has a watchdog (an accelerator mesh; here given to a CPU engine), the
    engine hands it the step trace's flush: `os._exit` skips `atexit`, and a failure's last
    steps are the ones worth reading."""
    from engine import watchdog

    dogs = []
    monkeypatch.setattr(
        watchdog, "for_mesh", lambda *a: dogs.append(watchdog.Watchdog(3600.0)) or dogs[-1]
    )
    traced = _traced_llm(folder, cache_dir, tmp_path / "steps.jsonl")
    assert dogs == [traced.engine.runner.watchdog]
    assert dogs[0].before_exit == [traced.engine._trace.flush]


def test_min_tokens_and_eos(llm, folder, prompts):
    """A +100 logit bias makes EOS (id 2) certain; min_tokens holds it off, ignore_eos too."""
    p = {"prompt_token_ids": prompts[4]}
    eos = dict(temperature=0.0, logit_bias={2: 100.0}, max_tokens=20)
    assert llm.generate(p, SamplingParams(**eos))[0].outputs[0].token_ids == [2]
    out = llm.generate(p, SamplingParams(**eos, min_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == 2 and 2 not in out.token_ids[:5]
    assert out.finish_reason == "stop"
    out = llm.generate(p, SamplingParams(**eos, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == [2] * 20 and out.finish_reason == "length"


def test_logprobs_match_transformers(llm, folder, prompts):
    import torch

    from tests.hf_models import hf_logits

    prompt = prompts[7]  # 100 tokens: its prompt logprobs span two chunks of the 64 budget
    out = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(
            temperature=0.0, max_tokens=4, logprobs=5, prompt_logprobs=3, ignore_eos=True
        ),
    )[0]
    seq = prompt + out.outputs[0].token_ids
    ref = torch.log_softmax(torch.tensor(hf_logits(folder, seq)), -1).numpy()
    for i, (tok, entry) in enumerate(
        zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)
    ):
        row = ref[len(prompt) - 1 + i]
        assert entry[tok].logprob == pytest.approx(row[tok], abs=1e-4)
        top = np.argsort(-row)[:5]
        assert set(top.tolist()) <= set(entry), "the 5 most likely ids are reported"
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        entry = out.prompt_logprobs[p]
        assert entry[prompt[p]].logprob == pytest.approx(ref[p - 1][prompt[p]], abs=1e-4)


def test_prompt_logprobs_in_chunks_match_numpy(folder):
    """A long step's prompt logprobs run `chunk` positions at a time (the last chunk padded):
    each position's stats equal numpy's log-softmax of the model's logits."""
    from flax import nnx

    from engine.step_fns import prompt_logprobs_fn
    from models.loader import load_model

    model = load_model(str(folder), dtype="float32")
    graphdef, state = nnx.split(model)
    params, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(3)
    t, d = 40, model.config.hidden_size
    hidden = rng.normal(size=(t, d)).astype(np.float32)
    ids = rng.integers(0, model.config.vocab_size, t).astype(np.int32)
    fn = jax.jit(prompt_logprobs_fn, static_argnames=("model_def", "chunk"))
    lp, ranks, top_ids, top_lp = fn((graphdef, treedef), params, hidden, ids, chunk=16)
    logits = np.asarray(model.logits(jax.numpy.asarray(hidden)), np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    want = ref[np.arange(t), ids]
    np.testing.assert_allclose(lp, want, atol=1e-4)
    np.testing.assert_array_equal(ranks, (ref >= want[:, None] - 1e-6).sum(-1))
    np.testing.assert_array_equal(top_ids[:, 0], ref.argmax(-1))
    np.testing.assert_allclose(top_lp[:, 0], ref.max(-1), atol=1e-4)


def test_penalties_match_numpy_reference(llm, folder, prompts):
    """Greedy with repetition/presence/frequency penalties, step by step against transformers'
    logits with the penalties applied in numpy (vLLM's definitions)."""
    prompt = prompts[3]
    sp = SamplingParams(
        temperature=0.0,
        repetition_penalty=1.5,
        presence_penalty=0.7,
        frequency_penalty=0.4,
        max_tokens=10,
        ignore_eos=True,
    )
    got = llm.generate({"prompt_token_ids": prompt}, sp)[0].outputs[0].token_ids
    from tests.hf_models import hf_logits

    out: list[int] = []
    for _ in range(10):
        logits = hf_logits(folder, prompt + out)[-1].astype(np.float64)
        seen = np.zeros_like(logits, bool)
        seen[prompt + out] = True
        logits = np.where(seen & (logits > 0), logits / 1.5, np.where(seen, logits * 1.5, logits))
        counts = np.bincount(out, minlength=logits.size)
        logits -= 0.4 * counts + 0.7 * (counts > 0)
        out.append(int(np.argmax(logits)))
    assert got == out


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        (list(range(3, 600)), GREEDY, "max_model_len"),
        ([5, 6, 320], GREEDY, "outside the vocabulary"),
        ([5, 6, -1], GREEDY, "outside the vocabulary"),
        ([], GREEDY, "empty"),
        ([5, 6], SamplingParams(logit_bias={999: 1.0}), "logit_bias"),
    ],
)
def test_bad_input_rejected_before_scheduling(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": prompt}], params)
    assert not llm.engine.has_unfinished_requests(), "nothing may be scheduled"
    assert llm.engine.allocator.num_free_pages == llm.engine.allocator.num_usable_pages


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(n=0), "n"),
        (dict(logprobs=21), "logprobs"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
