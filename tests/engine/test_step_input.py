"""The batch builder's buffer reuse: a refilled pooled buffer holds exactly what a fresh one
holds, whatever the step before it left there."""

from __future__ import annotations

import numpy as np

from engine.sampling_params import SamplingParams
from engine.step_input import BufferPool, StepLayout, build_step_input
from engine.types import ScheduledRequest, SchedulerOutput


def _step(rng: np.random.Generator, num_requests: int, layout: StepLayout) -> SchedulerOutput:
    """Random prefill chunks and decodes with random pages and sampling settings."""
    reqs = []
    for i in range(num_requests):
        n = int(rng.integers(1, 5))
        start = int(rng.integers(0, 40))
        pages = tuple(int(p) for p in rng.permutation(np.arange(1, 200))[: (start + n) // 4 + 1])
        params = SamplingParams(
            temperature=float(rng.choice([0.0, 0.7])),
            top_k=int(rng.choice([0, 5])),
            top_p=float(rng.choice([1.0, 0.9])),
            min_tokens=int(rng.integers(0, 3)),
            repetition_penalty=float(rng.choice([1.0, 1.2])),
        )
        reqs.append(
            ScheduledRequest(
                f"r{i}",
                tuple(int(t) for t in rng.integers(3, 100, n)),
                start,
                pages,
                bool(rng.integers(0, 2)),
                int(rng.integers(1, 50)),
                params,
                int(rng.integers(-1, 100)),
            )
        )
    return SchedulerOutput(tuple(reqs), sum(r.num_tokens for r in reqs))


def test_pooled_buffers_match_fresh_ones_after_other_steps():
    rng = np.random.default_rng(0)
    layout = StepLayout(num_tokens=64, num_requests=16, pages_per_request=16)
    pool = BufferPool()
    kw = dict(page_size=4, scratch_row=99)
    for num_requests in (16, 3, 11, 1, 0, 7):  # each refill follows a different, fuller step
        sched = _step(rng, num_requests, layout)
        rows, seeds = list(range(num_requests)), [7 * i + 1 for i in range(num_requests)]
        fresh = build_step_input(sched, layout, rows=rows, seeds=seeds, **kw)
        pooled = build_step_input(
            sched, layout, rows=rows, seeds=seeds, buffers=pool.get(layout), **kw
        )
        np.testing.assert_array_equal(pooled.model, fresh.model)
        np.testing.assert_array_equal(pooled.sample, fresh.sample)
        np.testing.assert_array_equal(pooled.next_token_ids, fresh.next_token_ids)
