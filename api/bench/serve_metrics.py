"""Serving metrics from per-request timings, defined exactly as `vllm bench serve` defines them
(`vllm/benchmarks/serve.py::calculate_metrics`), and its result JSON keys.

Per successful request: TTFT = first content chunk - send; E2EL (latency) = last content chunk -
send; TPOT = (E2EL - TTFT) / (output_tokens - 1), only where output_tokens > 1 (0 for goodput);
ITL = every gap between consecutive content chunks (pooled over requests). Throughputs divide by
the benchmark's wall duration. Goodput = requests meeting every SLO given / duration.
Pure functions: no I/O, so tests check them against hand-computed values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class RequestResult:
    """What the client measured for one request (times in seconds, `perf_counter` clock)."""

    success: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    itl: tuple[float, ...] = ()  # gaps between consecutive content chunks
    latency: float = 0.0  # send -> last content chunk
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""


@dataclass(frozen=True)
class Stats:
    """Mean, median, standard deviation and percentiles [(p, value)] of one metric, in ms."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ServeMetrics:
    """Aggregates over one benchmark run (vLLM's `BenchmarkMetrics`)."""

    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    stats: dict[str, Stats]  # by name in METRIC_NAMES
    output_lens: tuple[int, ...]  # per request, 0 for a failed one
    max_output_tokens_per_s: float
    max_concurrent_requests: int


def stats_ms(values_s: Sequence[float], percentiles: Sequence[float]) -> Stats:
    """Stats of `values_s` (seconds) in milliseconds; all 0 when empty, as vLLM."""
    v = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000
    return Stats(
        float(np.mean(v)),
        float(np.median(v)),
        float(np.std(v)),
        tuple((p, float(np.percentile(v, p))) for p in percentiles),
    )


def count_good(
    ttfts: Sequence[float],
    tpots: Sequence[float],
    e2els: Sequence[float],
    slos_ms: dict[str, float],
) -> int:
    """Requests whose every metric named in `slos_ms` is <= its SLO (ms; metrics in seconds)."""
    columns = {"ttft": ttfts, "tpot": tpots, "e2el": e2els}
    chosen = [(columns[name], slo / 1000) for name, slo in slos_ms.items()]
    if not chosen:
        return 0
    return sum(all(values[i] <= slo for values, slo in chosen) for i in range(len(chosen[0][0])))


def peak_rates(results: Iterable[RequestResult]) -> tuple[float, int]:
    """(most content chunks in any one-second bucket from the first send, most requests in
    flight at once), over successful requests, as vLLM's `max_output_tokens_per_s` and
    `max_concurrent_requests`."""
    ok = [r for r in results if r.success]
    if not ok:
        return 0.0, 0
    t0 = min(r.start_time for r in ok)
    end = max(r.start_time + r.latency for r in ok)
    buckets = np.zeros(int(np.ceil(end - t0)) + 1)
    for r in ok:
        times = r.start_time + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        for b in (times - t0).astype(int):
            if 0 <= b < len(buckets):
                buckets[b] += 1
    # Half-open [start, end): at a tie, a departure comes before an arrival.
    events = sorted([(r.start_time, 1) for r in ok] + [(r.start_time + r.latency, -1) for r in ok])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return float(buckets.max()), peak


def calculate_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    percentiles: Sequence[float],
    slos_ms: dict[str, float],
) -> ServeMetrics:
    """Aggregate per-request results of a run that lasted `duration_s` seconds."""
    ok = [r for r in results if r.success]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    # For goodput a request with a single output token has TPOT 0.
    all_tpots = [
        (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in ok
    ]
    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    itls = [gap for r in ok for gap in r.itl]
    output_lens = tuple(r.output_tokens if r.success else 0 for r in results)
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(output_lens)
    max_tokens_per_s, max_concurrent = peak_rates(ok)
    values = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    return ServeMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        total_input=total_input,
        total_output=total_output,
        request_throughput=len(ok) / duration_s,
        request_goodput=count_good(ttfts, all_tpots, e2els, slos_ms) / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        stats={name: stats_ms(values[name], percentiles) for name in METRIC_NAMES},
        output_lens=output_lens,
        max_output_tokens_per_s=max_tokens_per_s,
        max_concurrent_requests=max_concurrent,
    )


def percentile_word(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9" (vLLM's key spelling)."""
    return str(int(p)) if int(p) == p else str(p)


def result_dict(
    metrics: ServeMetrics,
    results: Sequence[RequestResult],
    duration_s: float,
    selected_metrics: Sequence[str],
    goodput_given: bool,
) -> dict[str, Any]:
    """vLLM's serve result JSON body (without the run description keys `date`, `model_id`...)."""
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput if goodput_given else None,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": list(metrics.output_lens),
        "ttfts": [r.ttft for r in results],
        "itls": [list(r.itl) for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
    }
    for name in METRIC_NAMES:
        if name not in selected_metrics:
            continue
        s = metrics.stats[name]
        out[f"mean_{name}_ms"] = s.mean
        out[f"median_{name}_ms"] = s.median
        out[f"std_{name}_ms"] = s.std
        for p, value in s.percentiles:
            out[f"p{percentile_word(p)}_{name}_ms"] = value
    return out


def parse_goodput(pairs: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0}; ValueError on a bad pair."""
    slos: dict[str, float] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or name not in GOODPUT_METRICS or not number >= 0:
            raise ValueError(
                f"bad --goodput entry {pair!r}: use KEY:MS with KEY one of "
                f"{', '.join(GOODPUT_METRICS)} and MS a non-negative number"
            )
        slos[name] = number
    return slos
