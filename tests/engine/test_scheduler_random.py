"""Randomized workloads through scheduler + allocator + fake runner (hypothesis).

Tiny page pools force preemption; shared prefixes exercise the prefix cache; aborts and external
finishes (stop strings) arrive at random steps. After every step the allocator invariants must
hold; at the end every page is free or cached with refcount 0, and every request that ran to
its own end produced exactly `reference_generate`'s tokens.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import SchedulerConfig, bucket_ladder
from engine.page_allocator import PageAllocator
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.types import Request
from tests.engine.fake_runner import (
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    FakeRunner,
    random_prompt,
    reference_generate,
)

MAX_MODEL_LEN = 32


def random_request(rng: random.Random, index: int, prefixes: list[list[int]]) -> Request:
    params = SamplingParams(
        max_tokens=rng.choice([1, 2, 5, 10, 20, None]),
        min_tokens=rng.choice([0, 0, 1]),
        ignore_eos=rng.random() < 0.3,
        stop_token_ids=[rng.randrange(VOCAB_SIZE)] if rng.random() < 0.2 else None,
    )
    return Request(
        request_id=f"r{index}",
        prompt_token_ids=random_prompt(rng, prefixes, MAX_MODEL_LEN),
        sampling_params=params,
        arrival_time=float(index),
        priority=rng.randrange(3),
        eos_token_id=EOS_TOKEN_ID,
    )


def fits(request: Request, num_usable_pages: int, page_size: int) -> bool:
    """Independent restatement of when a request can ever be served."""
    max_tokens = request.sampling_params.max_tokens or MAX_MODEL_LEN
    max_len = min(request.num_prompt_tokens + max_tokens, MAX_MODEL_LEN) - 1
    return -(-max_len // page_size) <= num_usable_pages


class Workload:
    """Drives one scheduler with random arrivals, aborts and external finishes."""

    def __init__(self, scheduler: Scheduler, runner: FakeRunner, rng: random.Random) -> None:
        self.scheduler, self.runner, self.rng = scheduler, runner, rng
        prefixes = [[rng.randrange(2, VOCAB_SIZE) for _ in range(rng.randint(4, 16))] for _ in "ab"]
        self.pending = [random_request(rng, i, prefixes) for i in range(rng.randint(1, 12))]
        self.added: dict[str, Request] = {}
        self.cut_short: set[str] = set()  # aborted or finished from outside
        self.outputs: dict[str, list[int]] = {}
        self.reasons: dict[str, str | None] = {}
        self.asynchronous = False
        self.inflight = None

    def arrive_and_cut(self) -> None:
        """Add some pending requests; now and then abort or stop-string-finish one."""
        allocator, rng = self.scheduler.allocator, self.rng
        while self.pending and rng.random() < 0.5:
            request = self.pending.pop()
            if fits(request, allocator.num_usable_pages, allocator.page_size):
                self.scheduler.add_request(request)
                self.added[request.request_id] = request
        unfinished = list(self.scheduler.requests)
        if unfinished and rng.random() < 0.05:
            victim = rng.choice(unfinished)
            self.cut_short.add(victim)
            if rng.random() < 0.5:
                self.scheduler.abort_request(victim)
            else:
                self.scheduler.finish_requests([victim], "stop", stop_reason="STOP")

    def step(self) -> None:
        """One checked engine step."""
        cfg, page_size = self.scheduler.config, self.scheduler.allocator.page_size
        out = self.scheduler.schedule()
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert out.num_batched_tokens == sum(r.num_tokens for r in out.requests)
        assert len(out.requests) <= cfg.max_num_seqs
        assert len({r.request_id for r in out.requests}) == len(out.requests)
        for scheduled in out.requests:
            # A (re)admitted request starts at 0 or at a whole number of cached pages.
            if scheduled.request_id not in self.runner.known:
                assert scheduled.start_position % page_size == 0
        result = self.runner.execute(out)
        if self.asynchronous:  # results of step N are applied after step N + 1 is scheduled
            previous, self.inflight = self.inflight, (out, result)
            if previous is not None:
                self.apply(*previous)
        else:
            self.apply(out, result)

    def apply(self, out, result) -> None:
        updates = self.scheduler.update(out, result)
        self.scheduler.check_invariants()
        for update in updates:
            self.outputs.setdefault(update.request_id, []).extend(update.new_token_ids)
            if update.finished:
                self.reasons[update.request_id] = update.finish_reason

    def check_outputs(self) -> None:
        """Requests that ran to their own end match the reference; cut ones are a prefix of it."""
        for request_id, request in self.added.items():
            params = request.sampling_params
            want = reference_generate(request.prompt_token_ids, params, MAX_MODEL_LEN)
            got = self.outputs.get(request_id, [])
            if request_id in self.cut_short:
                assert got == want[0][: len(got)], request_id
            else:
                assert (got, self.reasons[request_id]) == want, request_id
            assert request.num_cached_tokens <= request.num_prompt_tokens


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_pages=st.integers(3, 20),
    page_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 48),
    prefix_caching=st.booleans(),
    chunked=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    asynchronous=st.booleans(),
    fit_buckets=st.booleans(),
    admission_horizon=st.sampled_from([0, 1, 8, 128]),
    compute_bound_tokens=st.sampled_from([0, 2, 4, 512]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_workload(
    num_pages: int,
    page_size: int,
    max_num_seqs: int,
    budget: int,
    prefix_caching: bool,
    chunked: bool,
    policy: str,
    asynchronous: bool,
    fit_buckets: bool,
    admission_horizon: int,
    compute_bound_tokens: int,
    seed: int,
) -> None:
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget if chunked else max(budget, MAX_MODEL_LEN),
        max_model_len=MAX_MODEL_LEN,
        enable_chunked_prefill=chunked,
        policy=policy,
        admission_horizon=admission_horizon,
        compute_bound_tokens=compute_bound_tokens,
    )
    allocator = PageAllocator(num_pages, page_size, enable_prefix_caching=prefix_caching)
    buckets = bucket_ladder(2, cfg.max_num_batched_tokens, midpoints_from=8) if fit_buckets else ()
    scheduler = Scheduler(cfg, allocator, buckets)
    workload = Workload(scheduler, FakeRunner(num_pages, page_size), random.Random(seed))
    workload.asynchronous = asynchronous
    for _ in range(2000):
        workload.arrive_and_cut()
        if not workload.pending and not scheduler.has_unfinished_requests():
            break
        workload.step()
    else:
        raise AssertionError("workload did not finish: a request starved")
    if workload.inflight is not None:
        workload.apply(*workload.inflight)
    allocator.check_invariants([])
    assert allocator.num_free_pages == num_pages - 1, "pages leaked"
    workload.check_outputs()
