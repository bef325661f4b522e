"""Prometheus metrics of one app, in its own registry, with vLLM's names under `pagejax:`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.scheduler import SchedulerStats

# vLLM's bucket edges (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _SchedulerCollector(Collector):
    """Gauges read from the engines at scrape time: running, waiting, KV-cache usage; one
    sample per engine (label `engine`, its data-parallel rank, as vLLM's)."""

    _FAMILIES = (  # name, help, SchedulerStats field, kind
        ("num_requests_running", "Requests in the running batch.", "num_running", "gauge"),
        ("num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting", "gauge"),
        ("kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = full).", "page_usage",
         "gauge"),
        ("num_preemptions", "Preemptions since start.", "num_preemptions", "counter"),
        ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "num_cached_tokens",
         "counter"),
        ("num_requests_aborted", "Sequences aborted since start, as when a client goes away "
         "(a request of n > 1 sequences counts n).", "num_aborted", "counter"),
    )  # fmt: skip

    def __init__(self, stats: Callable[[], Sequence[SchedulerStats]], model_name: str):
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterable[Metric]:
        each = self._stats()
        for name, doc, field, kind in self._FAMILIES:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(f"pagejax:{name}", doc, labels=["engine", "model_name"])
            for rank, s in enumerate(each):
                metric.add_metric([str(rank), self._model], getattr(s, field))
            yield metric


class Metrics:
    """Request counters and latency histograms, plus each engine's gauges at scrape time
    (`stats`: `AsyncEngine.stats`)."""

    def __init__(self, stats: Callable[[], Sequence[SchedulerStats]], model_name: str):
        self.registry = CollectorRegistry()
        self._model = model_name
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter(
            "pagejax:prompt_tokens", "Prompt tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "pagejax:generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.request_success = Counter(
            "pagejax:request_success",
            "Completions finished, by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "pagejax:time_to_first_token_seconds",
            "Time to the first token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pagejax:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pagejax:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        r.register(_SchedulerCollector(stats, model_name))
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e):
            metric.labels(model_name)  # exported (as zeros) before the first request

    def observe_finished(
        self,
        *,
        num_prompt_tokens: int,
        num_tokens: int,
        ttft: float,
        e2e: float,
        finish_reasons: Sequence[str],
    ) -> None:
        m = self._model
        self.prompt_tokens.labels(m).inc(num_prompt_tokens)
        self.generation_tokens.labels(m).inc(num_tokens)
        for reason in finish_reasons:
            self.request_success.labels(m, reason).inc()
        self.ttft.labels(m).observe(ttft)
        self.e2e.labels(m).observe(e2e)
        if num_tokens > 1:
            self.tpot.labels(m).observe((e2e - ttft) / (num_tokens - 1))

    def render(self) -> bytes:
        """The text exposition format (reads the engine's stats: call off the event loop)."""
        return generate_latest(self.registry)
