"""Scheduler behaviour, each against a hand-computed value or `reference_generate`."""

from __future__ import annotations

import itertools

import pytest

from engine.config import SchedulerConfig
from engine.page_allocator import PageAllocator
from engine.sampling_params import SamplingParams
from engine.scheduler import QueueFullError, Scheduler
from engine.types import (
    Request,
    RequestUpdate,
    SchedulerOutput,
    StepOutput,
    TokenLogprobs,
)
from tests.engine.fake_runner import EOS_TOKEN_ID, FakeRunner, reference_generate

PAGE_SIZE = 4


def make_scheduler(
    num_pages: int = 64,
    prefix_caching: bool = True,
    token_buckets: tuple[int, ...] = (),
    **config: object,
) -> tuple[Scheduler, FakeRunner]:
    cfg = SchedulerConfig(**{"max_model_len": 64, "max_num_batched_tokens": 64, **config})
    allocator = PageAllocator(num_pages, PAGE_SIZE, enable_prefix_caching=prefix_caching)
    return Scheduler(cfg, allocator, token_buckets), FakeRunner(num_pages, PAGE_SIZE)


_clock = itertools.count()


def make_request(
    request_id: str, prompt: list[int], priority: int = 0, **params: object
) -> Request:
    return Request(
        request_id,
        list(prompt),
        SamplingParams(**params),
        arrival_time=float(next(_clock)),
        priority=priority,
        eos_token_id=EOS_TOKEN_ID,
    )


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    out = scheduler.schedule()
    updates = scheduler.update(out, runner.execute(out))
    scheduler.check_invariants()
    return out, updates


def run_all(scheduler: Scheduler, runner: FakeRunner) -> tuple[dict[str, list[int]], dict]:
    """Step until done; returns output ids and finish reasons per request."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    for _ in range(10_000):
        if not scheduler.has_unfinished_requests():
            return tokens, reasons
        _, updates = step(scheduler, runner)
        for update in updates:
            tokens.setdefault(update.request_id, []).extend(update.new_token_ids)
            if update.finished:
                reasons[update.request_id] = update.finish_reason
    raise AssertionError("scheduler did not finish")


def test_decode_is_one_token_and_samples_only_at_prompt_end() -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", list(range(2, 22)), max_tokens=3, ignore_eos=True))
    outs = [step(scheduler, runner)[0] for _ in range(5)]
    chunks = [(o.requests[0].start_position, o.requests[0].num_tokens) for o in outs]
    assert chunks == [(0, 8), (8, 8), (16, 4), (20, 1), (21, 1)]
    assert [o.requests[0].sample for o in outs] == [False, False, True, True, True]
    assert not scheduler.has_unfinished_requests()
    assert outs[-1].requests[0].token_ids == (runner.kv[outs[-1].requests[0].page_ids[-1]][1],)


def test_chunked_prefill_shares_the_budget() -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=16)
    scheduler.add_request(make_request("a", [5] * 20, max_tokens=2))
    scheduler.add_request(make_request("b", [6] * 20, max_tokens=2))
    first = step(scheduler, runner)[0]
    assert [(r.request_id, r.num_tokens) for r in first.requests] == [("a", 16)]
    second = step(scheduler, runner)[0]
    assert [(r.request_id, r.num_tokens) for r in second.requests] == [("a", 4), ("b", 12)]
    assert second.num_batched_tokens == 16


def test_step_trimmed_to_fit_a_token_bucket() -> None:
    """3 decodes + a 16-token prompt = 19 tokens would run padded to 32: the prompt's chunk is
    cut to 13 so the step is exactly 16, and its last 3 tokens join the next decode step.
    (Padded rows cost matmul time from 16 tokens here: `compute_bound_tokens`.)"""
    scheduler, runner = make_scheduler(token_buckets=(4, 8, 16, 32, 64), compute_bound_tokens=16)
    prompt = list(range(1, 17))
    for i in range(3):
        scheduler.add_request(make_request(f"d{i}", [7, i], max_tokens=6, ignore_eos=True))
    step(scheduler, runner)
    scheduler.add_request(make_request("p", prompt, max_tokens=3, ignore_eos=True))
    got = []
    out, updates = step(scheduler, runner)
    assert [r.num_tokens for r in out.requests] == [1, 1, 1, 13]
    assert out.num_batched_tokens == 16 and not out.requests[-1].sample
    got += [t for u in updates if u.request_id == "p" for t in u.new_token_ids]
    out, updates = step(scheduler, runner)
    assert [r.num_tokens for r in out.requests] == [1, 1, 1, 3]
    got += [t for u in updates if u.request_id == "p" for t in u.new_token_ids]
    tokens, _ = run_all(scheduler, runner)
    want, _ = reference_generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True), 64)
    assert got + tokens["p"] == want


def test_step_not_trimmed_when_padding_is_cheaper() -> None:
    """3 decodes + a 28-token prompt = 31 tokens: one token of padding to 32 beats deferring
    15 tokens to the next step, and a step exactly on a bucket is left alone."""
    scheduler, runner = make_scheduler(token_buckets=(4, 8, 16, 32, 64))
    for i in range(3):
        scheduler.add_request(make_request(f"d{i}", [7, i], max_tokens=6))
    step(scheduler, runner)
    scheduler.add_request(make_request("p", list(range(1, 29)), max_tokens=3))
    out = step(scheduler, runner)[0]
    assert [r.num_tokens for r in out.requests] == [1, 1, 1, 28]


def test_prompt_tail_not_trimmed_into_a_token_a_step() -> None:
    """7 decodes fill the 8-token bucket. A 3-token prompt beside them makes 10 tokens: cut to
    fit 8, it would get one token a step for three steps, the deferred tokens pushing the
    next step past 8 (until only one is left). So the step runs in 16 with the whole prompt,
    which samples at once. (Padding costs from 8 tokens here: `compute_bound_tokens`.)"""
    scheduler, runner = make_scheduler(token_buckets=(4, 8, 16, 32, 64), compute_bound_tokens=8)
    for i in range(7):
        scheduler.add_request(make_request(f"d{i}", [7, i], max_tokens=6, ignore_eos=True))
    step(scheduler, runner)
    scheduler.add_request(make_request("p", [1, 2, 3], max_tokens=3, ignore_eos=True))
    out = step(scheduler, runner)[0]
    assert [r.num_tokens for r in out.requests] == [1] * 7 + [3]
    assert out.requests[-1].sample


def test_step_not_trimmed_below_compute_bound_tokens() -> None:
    """The 19 tokens of the trimmed test above, with padded rows free up to 64 tokens: the
    step runs in 32 with the whole prompt, which samples its first token a step sooner."""
    scheduler, runner = make_scheduler(token_buckets=(4, 8, 16, 32, 64), compute_bound_tokens=64)
    for i in range(3):
        scheduler.add_request(make_request(f"d{i}", [7, i], max_tokens=6, ignore_eos=True))
    step(scheduler, runner)
    scheduler.add_request(make_request("p", list(range(1, 17)), max_tokens=3, ignore_eos=True))
    out = step(scheduler, runner)[0]
    assert [r.num_tokens for r in out.requests] == [1, 1, 1, 16]
    assert out.requests[-1].sample


@pytest.mark.parametrize(
    ("token_buckets", "chunk"),
    [((4, 8, 16, 32, 36, 64), 31), ((4, 8, 16, 32, 37, 64), 30), ((4, 8, 16, 32, 64), 30)],
    ids=["rung_an_eighth_above", "rung_just_past_an_eighth", "powers_of_two"],
)
def test_step_not_trimmed_into_a_rung_an_eighth_above(token_buckets, chunk) -> None:
    """2 decodes + a 31-token prompt = 33 tokens. With a rung of 36 (at most an eighth above
    32, as 1,088 is above 1,024) the step runs whole and the prompt samples at once; with a
    rung of 37, or with powers of two (64), the prompt's chunk is cut to 30 to fit 32."""
    scheduler, runner = make_scheduler(token_buckets=token_buckets, compute_bound_tokens=32)
    for i in range(2):
        scheduler.add_request(make_request(f"d{i}", [7, i], max_tokens=6, ignore_eos=True))
    step(scheduler, runner)
    scheduler.add_request(make_request("p", list(range(1, 32)), max_tokens=3, ignore_eos=True))
    out = step(scheduler, runner)[0]
    assert [r.num_tokens for r in out.requests] == [1, 1, chunk]
    assert out.requests[-1].sample == (chunk == 31)


def test_long_prefill_token_threshold_caps_each_prompt_chunk() -> None:
    """Each prompt gets at most 8 tokens a step though the budget holds 64; two prompts share
    a step, and decodes are unaffected."""
    scheduler, runner = make_scheduler(long_prefill_token_threshold=8)
    scheduler.add_request(make_request("a", [5] * 20, max_tokens=2, ignore_eos=True))
    scheduler.add_request(make_request("b", [6] * 12, max_tokens=2, ignore_eos=True))
    sizes = []
    while scheduler.has_unfinished_requests():
        out = step(scheduler, runner)[0]
        sizes.append([(r.request_id, r.num_tokens) for r in out.requests])
    assert sizes == [
        [("a", 8), ("b", 8)],
        [("a", 8), ("b", 4)],
        [("a", 4), ("b", 1)],
        [("a", 1)],
    ]


def test_no_chunking_admits_whole_prompts_only() -> None:
    scheduler, runner = make_scheduler(
        max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False
    )
    scheduler.add_request(make_request("a", [5] * 40, max_tokens=2))
    scheduler.add_request(make_request("b", [6] * 40, max_tokens=2))
    first = step(scheduler, runner)[0]
    assert [(r.request_id, r.num_tokens) for r in first.requests] == [("a", 40)]


def test_max_num_seqs_respected() -> None:
    scheduler, runner = make_scheduler(max_num_seqs=2)
    for i in range(5):
        scheduler.add_request(make_request(str(i), [i + 2] * 3, max_tokens=4, ignore_eos=True))
    while scheduler.has_unfinished_requests():
        out, _ = step(scheduler, runner)
        assert len(out.requests) <= 2 and len(scheduler.running) <= 2


def test_outputs_match_reference() -> None:
    scheduler, runner = make_scheduler(max_num_batched_tokens=8)
    prompts = {str(i): [i + 2] * (3 + 5 * i) for i in range(4)}
    params = {"max_tokens": 20, "min_tokens": 2}
    for rid, prompt in prompts.items():
        scheduler.add_request(make_request(rid, prompt, **params))
    tokens, reasons = run_all(scheduler, runner)
    for rid, prompt in prompts.items():
        want = reference_generate(prompt, SamplingParams(**params), max_model_len=64)
        assert (tokens[rid], reasons[rid]) == want


def test_prefix_caching_reduces_computed_tokens() -> None:
    prefix = list(range(2, 30))
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    computed = {}
    for caching in (False, True):
        scheduler, runner = make_scheduler(prefix_caching=caching)
        scheduler.add_request(make_request("a", prefix + [3], max_tokens=2))
        run_all(scheduler, runner)
        scheduler.add_request(make_request("b", prefix + [4, 5], max_tokens=2, ignore_eos=True))
        out, updates = step(scheduler, runner)
        computed[caching] = out.requests[0].start_position, out.num_batched_tokens
        tokens, _ = run_all(scheduler, runner)
        # The fake model reads the hit pages back, so equal outputs mean the right pages.
        got = list(updates[0].new_token_ids) + tokens["b"]
        assert got == reference_generate(prefix + [4, 5], params, max_model_len=64)[0]
    assert computed[False] == (0, 30)
    assert computed[True] == (28, 2)  # 7 full pages of the 28-token prefix hit


def test_preemption_recomputes_and_finishes_with_right_outputs() -> None:
    # 6 usable pages; 3 requests that each grow to 3 pages cannot all stay resident.
    scheduler, runner = make_scheduler(num_pages=7, max_num_batched_tokens=32, admission_horizon=0)
    prompts = {str(i): [i + 2] * 4 for i in range(3)}
    for rid, prompt in prompts.items():
        scheduler.add_request(make_request(rid, prompt, max_tokens=8, ignore_eos=True))
    tokens, reasons = run_all(scheduler, runner)
    assert scheduler.num_preemptions > 0
    for rid, prompt in prompts.items():
        want = reference_generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True), 64)
        assert (tokens[rid], reasons[rid]) == want and len(tokens[rid]) == 8
    assert scheduler.allocator.num_free_pages == 6


def test_fcfs_preempts_newest_and_reports_it() -> None:
    scheduler, runner = make_scheduler(num_pages=5, max_num_batched_tokens=32, admission_horizon=0)
    scheduler.add_request(make_request("old", [2] * 7, max_tokens=8, ignore_eos=True))
    scheduler.add_request(make_request("new", [3] * 7, max_tokens=8, ignore_eos=True))
    step(scheduler, runner)  # both prefilled: 2 pages each, all 4 used
    step(scheduler, runner)  # position 7 still fits in 2 pages
    out, _ = step(scheduler, runner)  # position 8 needs a third page
    assert out.preempted_request_ids == {"new"}
    assert [r.request_id for r in out.requests] == ["old"]
    assert [r.request_id for r in scheduler.waiting] == ["new"]
    assert scheduler.waiting[0].num_computed_tokens == 0
    assert scheduler.waiting[0].num_output_tokens == 2  # kept, to be recomputed


def test_admission_keeps_free_the_pages_running_requests_grow_into() -> None:
    # 5 usable pages. "b" (3 pages) would fit in the 3 that "a" leaves, but "a" grows into
    # 2 more (15 tokens): with "b" in, "b" would be preempted and recomputed.
    scheduler, runner = make_scheduler(num_pages=6, max_num_batched_tokens=32)
    scheduler.add_request(make_request("a", [2] * 7, max_tokens=8, ignore_eos=True))
    _, first = step(scheduler, runner)
    scheduler.add_request(make_request("b", [3] * 12, max_tokens=4, ignore_eos=True))
    out, second = step(scheduler, runner)
    assert [r.request_id for r in out.requests] == ["a"]  # "b" waits: 3 + 2 reserved > 3
    tokens, reasons = run_all(scheduler, runner)
    tokens["a"] = [*first[0].new_token_ids, *second[0].new_token_ids, *tokens["a"]]
    assert scheduler.num_preemptions == 0
    for rid, prompt, n in (("a", [2] * 7, 8), ("b", [3] * 12, 4)):
        want = reference_generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), 64)
        assert (tokens[rid], reasons[rid]) == want


def test_admission_reserves_the_rest_of_a_chunked_prompt() -> None:
    # 5 usable pages, 8 tokens a step. "b" (13 tokens, 4 pages) would start with a chunk that
    # fits beside "a"; its later chunks would then take the pages "a" needs and preempt.
    scheduler, runner = make_scheduler(num_pages=6, max_num_batched_tokens=8)
    prompts = {"a": ([2] * 3, 8), "b": ([3] * 13, 4)}
    for rid, (prompt, n) in prompts.items():
        scheduler.add_request(make_request(rid, prompt, max_tokens=n, ignore_eos=True))
    tokens, reasons = run_all(scheduler, runner)
    assert scheduler.num_preemptions == 0
    for rid, (prompt, n) in prompts.items():
        want = reference_generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), 64)
        assert (tokens[rid], reasons[rid]) == want


@pytest.mark.parametrize(
    ("num_pages", "compute_bound_tokens", "most_running"),
    [
        (11, 8, 4),  # room for 5: stop at the bucket 4, not 5 padded to 8
        (11, 0, 5),  # the stop turned off: as many as the cache holds
        (13, 8, 6),  # room for 6 = 3/4 of the bucket 8: worth its padding
        (11, 16, 5),  # the bucket 8 is below compute_bound_tokens: padding to it is free
    ],
)
def test_running_requests_stop_at_a_bucket_the_cache_would_barely_pass(
    num_pages: int, compute_bound_tokens: int, most_running: int
) -> None:
    # Each request: 3 prompt + 4 output tokens, 2 pages of 4 reserved from admission.
    scheduler, runner = make_scheduler(
        num_pages=num_pages,
        token_buckets=(2, 4, 8, 16, 64),
        max_num_seqs=16,
        compute_bound_tokens=compute_bound_tokens,
    )
    prompts = {f"r{i}": [2 + i] * 3 for i in range(12)}
    for rid, prompt in prompts.items():
        scheduler.add_request(make_request(rid, prompt, max_tokens=4, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    seen = 0
    while scheduler.has_unfinished_requests():
        _, updates = step(scheduler, runner)
        seen = max(seen, len(scheduler.running) + sum(u.finished for u in updates))
        for u in updates:
            tokens.setdefault(u.request_id, []).extend(u.new_token_ids)
    assert seen == most_running
    assert scheduler.num_preemptions == 0
    for rid, prompt in prompts.items():
        want = reference_generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True), 64)
        assert tokens[rid] == want[0]


def test_priority_preempts_least_important_even_if_already_scheduled() -> None:
    scheduler, runner = make_scheduler(
        num_pages=5, max_num_batched_tokens=32, admission_horizon=0, policy="priority"
    )
    scheduler.add_request(make_request("low", [2] * 5, priority=5, max_tokens=8, ignore_eos=True))
    step(scheduler, runner)
    scheduler.add_request(make_request("high", [3] * 7, priority=0, max_tokens=8, ignore_eos=True))
    step(scheduler, runner)  # 4 pages used: "low" at 7 tokens, "high" at 8
    step(scheduler, runner)  # both still fit
    # "low" (first in the batch) fits again, "high" needs a third page: "low" gives way.
    out, _ = step(scheduler, runner)
    assert out.preempted_request_ids == {"low"}
    assert [r.request_id for r in out.requests] == ["high"]
    assert out.num_batched_tokens == 1  # the budget "low" had taken was given back


def test_priority_orders_admission() -> None:
    scheduler, runner = make_scheduler(max_num_seqs=1, policy="priority")
    for rid, priority in [("c", 2), ("a", 0), ("b", 1), ("a2", 0)]:
        scheduler.add_request(make_request(rid, [4, 5], priority=priority, max_tokens=1))
    order = [step(scheduler, runner)[0].requests[0].request_id for _ in range(4)]
    assert order == ["a", "a2", "b", "c"]


def test_stop_conditions() -> None:
    scheduler, runner = make_scheduler()
    prompt = [7, 8, 9]
    first = reference_generate(prompt, SamplingParams(max_tokens=1), 64)[0][0]
    cases = {
        "eos": ({"max_tokens": 5}, prompt, 5),
        "stop_id": ({"max_tokens": 5, "stop_token_ids": [first]}, prompt, 5),
        "min": ({"max_tokens": 3, "min_tokens": 3, "stop_token_ids": [first]}, prompt, 5),
        "model_len": ({"max_tokens": None, "ignore_eos": True}, [2] * 60, 64),
        "min_eos": ({"max_tokens": 6, "min_tokens": 2}, prompt, 5),
    }
    for rid, (params, p, _) in cases.items():
        request = make_request(rid, p, **params)
        request.eos_token_id = first if rid in ("eos", "min_eos") else EOS_TOKEN_ID
        scheduler.add_request(request)
    tokens, reasons = run_all(scheduler, runner)
    assert (tokens["eos"], reasons["eos"]) == ([first], "stop")
    assert (tokens["stop_id"], reasons["stop_id"]) == ([first], "stop")
    assert (len(tokens["min"]), reasons["min"]) == (3, "length")
    assert (len(tokens["model_len"]), reasons["model_len"]) == (4, "length")
    # EOS as the first token does not stop before min_tokens.
    want = reference_generate(prompt, SamplingParams(max_tokens=6, min_tokens=2), 64, eos=first)
    assert (tokens["min_eos"], reasons["min_eos"]) == want and len(want[0]) >= 2


def test_stop_token_sets_stop_reason() -> None:
    scheduler, runner = make_scheduler()
    first = reference_generate([7, 8], SamplingParams(max_tokens=1), 64)[0][0]
    scheduler.add_request(make_request("a", [7, 8], stop_token_ids=[first]))
    _, updates = step(scheduler, runner)
    assert updates == [RequestUpdate("a", (first,), True, "stop", first)]


def test_abort_and_finish_requests() -> None:
    scheduler, runner = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("run", [2, 3], max_tokens=10, ignore_eos=True))
    scheduler.add_request(make_request("wait", [2, 3], max_tokens=10))
    scheduler.add_request(make_request("stop", [4, 5], max_tokens=10))
    out = scheduler.schedule()
    scheduler.abort_request(["run", "wait", "unknown"])
    assert scheduler.update(out, runner.execute(out)) == []  # "run" finished in between
    scheduler.check_invariants()
    out, _ = step(scheduler, runner)
    assert out.finished_request_ids == {"run", "wait"}
    scheduler.finish_requests("stop", "stop", stop_reason="</s>")
    assert scheduler.schedule().finished_request_ids == {"stop"}
    assert not scheduler.has_unfinished_requests()
    assert scheduler.allocator.usage == 0.0


def test_add_request_validation() -> None:
    scheduler, _ = make_scheduler(max_waiting_requests=1, max_num_seqs=1)
    with pytest.raises(ValueError, match="maximum context length"):
        scheduler.add_request(make_request("long", [2] * 65))
    with pytest.raises(ValueError, match="at least one token"):
        scheduler.add_request(make_request("empty", []))
    scheduler.add_request(make_request("a", [2]))  # the next step runs it: one free slot
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", [2]))
    scheduler.add_request(make_request("b", [2]))  # waits: the one waiting place
    with pytest.raises(QueueFullError):
        scheduler.add_request(make_request("c", [2]))
    scheduler.schedule()  # "a" runs, no slot is free: "b" alone fills the queue
    with pytest.raises(QueueFullError):
        scheduler.add_request(make_request("c", [2]))
    small, _ = make_scheduler(num_pages=3)
    with pytest.raises(ValueError, match="does not fit"):
        small.add_request(make_request("big", [2] * 10, max_tokens=5))


def test_prompt_logprobs_forwarded_once_per_position() -> None:
    scheduler, _ = make_scheduler(max_num_batched_tokens=4, prefix_caching=True)
    scheduler.add_request(make_request("a", list(range(2, 12)), prompt_logprobs=1, max_tokens=1))
    got = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        req = out.requests[0]
        # Positions p of this chunk with p + 1 < 10 predict prompt token p + 1.
        end = min(req.start_position + req.num_tokens, 9)
        entries = {"a": [TokenLogprobs(p + 1, -0.5, 1) for p in range(req.start_position, end)]}
        updates = scheduler.update(out, StepOutput([3], prompt_logprobs=entries))
        got += [e.token_id for u in updates for e in u.new_prompt_logprobs]
    assert got == list(range(1, 10))
    assert scheduler.stats().num_cached_tokens == 0  # prompt logprobs disable prefix hits


@pytest.mark.parametrize("usage, largest_step", [("server", 2048), ("offline", 3092)])
def test_a_gpu_server_takes_a_burst_of_prompts_in_steps_of_at_most_2048_tokens(
    usage: str, largest_step: int
) -> None:
    """The server's default budget on an accelerator (`platform_defaults`): three 1,024-token
    prompts arriving together beside 20 decodes run in steps of at most 2,048 tokens, the
    first prompt whole in the first of them. Offline's 8,192 (the control) takes all three in
    one step of 3,092 tokens, which a GPU runs padded to its 4,096-token bucket."""
    from engine.config import bucket_ladder
    from engine.llm import platform_defaults

    defaults = platform_defaults("gpu", usage)
    ladder = bucket_ladder(16, defaults["max_num_batched_tokens"])  # the GPU runner's
    scheduler, runner = make_scheduler(num_pages=4096, token_buckets=ladder, **defaults)
    for i in range(20):
        prompt = [3 + i, *range(100, 107)]
        scheduler.add_request(make_request(f"d{i}", prompt, max_tokens=50, ignore_eos=True))
    step(scheduler, runner)  # the 20 prompts; from here on they decode
    for i in range(3):
        prompt = [50 + i, *range(1000, 2023)]  # 1,024 tokens, no shared prefix
        scheduler.add_request(make_request(f"p{i}", prompt, max_tokens=4, ignore_eos=True))
    sizes, sampled_at = [], {}
    while len(sampled_at) < 3:
        out, updates = step(scheduler, runner)
        sizes.append(out.num_batched_tokens)
        for update in updates:
            if update.request_id.startswith("p"):
                sampled_at.setdefault(update.request_id, len(sizes))
    assert max(sizes) == largest_step
    assert sizes[0] == largest_step and sampled_at["p0"] == 1
