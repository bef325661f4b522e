"""`scripts/step_trace_summary.py` on a hand-written trace, against hand-computed medians."""

from __future__ import annotations

import pytest

from tests.scripts import load_script

step_trace_summary = load_script("step_trace_summary")


def _line(t, tokens, bucket, wait=0.0, sched=0.5, disp=1.0, outputs=0.25, requests=2, prefill=0):
    return {
        "t": t, "schedule_ms": sched, "dispatch_ms": disp, "wait_ms": wait,
        "outputs_ms": outputs, "tokens": tokens, "bucket": bucket, "requests": requests,
        "prefill_tokens": prefill, "outputs": requests,
    }  # fmt: skip


def test_steps_grouped_by_bucket_with_the_next_lines_wait():
    lines = [
        _line(0.000, 20, 32, prefill=18),  # a prefill step: its wait shows on the next line
        _line(0.002, 2, 16, wait=25.0),
        _line(0.029, 2, 16, wait=3.0, disp=3.0),
        _line(0.036, 2, 16, wait=4.0),
        _line(5.000, 0, 0, wait=2.0),  # after 5 s idle: the step before it is left out
        _line(5.001, 0, 0),
    ]
    # Steps complete (end of each line's wait) at 1.5, 28.5, 35.5 and 41.5 ms.
    got = step_trace_summary.summarize(lines)
    assert sorted(got) == [16, 32]
    assert got[32] == pytest.approx({
        "steps": 1, "period_ms": 27.0, "host_ms": 1.5, "wait_ms": 25.0, "outputs_ms": 0.25,
        "requests": 2, "prefill": 18,
    })  # fmt: skip
    assert got[16]["steps"] == 2  # the third 16-token step is followed by the idle gap
    assert abs(got[16]["period_ms"] - 6.5) < 1e-9  # median of 7.0 and 6.0
    assert got[16]["host_ms"] == 2.5  # median of 1.5 and 3.5
    assert got[16]["wait_ms"] == 3.5  # median of the next lines' 3.0 and 4.0
    table = step_trace_summary.markdown(got)
    assert table.splitlines()[0].startswith("| bucket | steps | period_ms")
    assert len(table.splitlines()) == 4


def test_ttft_split_into_stages_by_arrival():
    """Two client requests matched to the prompts that arrived at or after their sends (the
    warm-up request's arrival, before them, to neither), their TTFTs split at the engine's
    steps. Hand-computed: request 1 is sent at 10.000 s, arrives at 10.002, starts in the
    step scheduled at 10.003, its last chunk is back at 10.020 + 13.5 ms, outputs take 0.5 ms
    and the client has the first chunk at 10.040."""

    def traced(t, starts=(), ends=(), **kw):
        return _line(t, 16, 16, **kw) | {"prompt_starts": list(starts), "prompt_ends": list(ends)}

    lines = [
        traced(9.000, [9.0], [9.0]),  # the client's warm-up request
        traced(9.010),
        traced(10.003, [10.002]),
        traced(10.010, (), [10.002], wait=5.0),
        traced(10.020, wait=12.0, outputs=0.5),
        traced(10.054, [10.053], [10.053]),
        traced(10.060, sched=1.0, disp=2.0, wait=20.0, outputs=1.0),
    ]
    result = {"start_times": [10.050, 10.000], "ttfts": [0.045, 0.040]}
    rows, swapped = step_trace_summary.ttft_stages(lines, result)
    assert swapped == 0
    want = [
        {"to_engine": 2.0, "queue": 1.0, "prompt": 30.5, "outputs": 0.5, "delivery": 6.0},
        {"to_engine": 3.0, "queue": 1.0, "prompt": 29.0, "outputs": 1.0, "delivery": 11.0},
    ]
    for row, w, ttft in zip(rows, want, (40.0, 45.0), strict=True):
        assert row == pytest.approx(w | {"ttft": ttft})
        assert sum(row[k] for k in w) == pytest.approx(ttft)
    table = step_trace_summary.ttft_table(rows)
    assert "| prompt | 29.75 |" in table and table.startswith("2 requests")


def test_a_failed_request_keeps_its_arrival_out_of_the_next_match():
    """A request that failed (no TTFT) still reached the engine: its arrival is skipped, not
    given to the next send, whose stages stay those of its own prompt."""

    def traced(t, starts=(), ends=(), **kw):
        return _line(t, 16, 16, **kw) | {"prompt_starts": list(starts), "prompt_ends": list(ends)}

    lines = [
        traced(10.003, [10.002], [10.002]),
        traced(10.010, wait=5.0),
        traced(10.012, [10.011], [10.011]),
        traced(10.020, wait=2.0),
    ]
    result = {"start_times": [10.000, 10.010], "ttfts": [None, 0.020]}
    rows, swapped = step_trace_summary.ttft_stages(lines, result)
    assert swapped == 0 and len(rows) == 1
    assert rows[0]["to_engine"] == pytest.approx(1.0)  # 10.010 -> 10.011, not 10.002
    assert rows[0]["delivery"] == pytest.approx(6.25)  # first chunk 30 ms, made at 23.75
