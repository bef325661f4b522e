"""`pagejax bench serve` end to end against a fake OpenAI-compatible SSE server (known delays,
known usage) run with uvicorn on 127.0.0.1 in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from api.cli import main

TTFT_S = 0.05  # the fake server's delay before the first token
ITL_S = 0.01  # and between tokens


class FakeOpenAIServer:
    """Streams `max_tokens` chunks per completion with fixed delays; reports usage with one
    extra prompt token (as a server that adds BOS) and records requests and peak concurrency."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ]
        )

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.bodies.append(body)
        return StreamingResponse(self._events(body), media_type="text/event-stream")

    async def _events(self, body: dict[str, Any]):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(TTFT_S)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(ITL_S)
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f" t{i}"}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {
                "prompt_tokens": len(body["prompt"]) + 1,
                "completion_tokens": body["max_tokens"],
            }
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def run_bench_serve(base_url: str, result: Path, *extra: str) -> dict[str, Any]:
    argv = ["bench", "serve", "--base-url", base_url, "--save-result"]
    argv += ["--result-dir", str(result.parent), "--result-filename", result.name]
    argv += ["--disable-tqdm", *extra]
    assert main(argv) == 0
    return json.loads(result.read_text())


def test_serve_against_fake_server(tmp_path):
    fake = FakeOpenAIServer()
    with serving(fake.app) as url:
        r = run_bench_serve(
            url, tmp_path / "r.json",
            "--num-prompts", "6", "--random-input-len", "8", "--random-output-len", "4",
            "--ignore-eos", "--max-concurrency", "2", "--goodput", "ttft:10000",
            "--metric-percentiles", "50,99",
        )  # fmt: skip
    assert len(fake.bodies) == 7  # the test request, then the benchmark
    body = fake.bodies[-1]
    assert body["model"] == "fake-model"  # from /v1/models
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 4
    assert len(body["prompt"]) == 8 and all(isinstance(t, int) for t in body["prompt"])
    assert fake.max_in_flight <= 2
    assert (r["completed"], r["failed"]) == (6, 0)
    assert r["total_input_tokens"] == 6 * 9  # the server's usage wins over the drawn length
    assert r["total_output_tokens"] == 6 * 4
    assert r["output_lens"] == [4] * 6
    assert all(len(itls) == 3 for itls in r["itls"])
    assert min(r["ttfts"]) >= TTFT_S
    # Single gaps jitter with delivery; their mean cannot fall far below the server's delay.
    assert r["mean_itl_ms"] >= ITL_S * 1000 * 0.8
    assert r["mean_tpot_ms"] >= ITL_S * 1000 * 0.8
    for key in ("median_itl_ms", "p50_e2el_ms", "p99_tpot_ms", "std_ttft_ms"):
        assert key in r
    # Three waves of two requests: the run takes at least three request times.
    assert r["duration"] >= 3 * (TTFT_S + 3 * ITL_S)
    assert r["request_throughput"] == pytest.approx(6 / r["duration"])
    assert r["request_goodput"] == pytest.approx(6 / r["duration"])  # all meet a 10 s TTFT
    assert r["output_throughput"] == pytest.approx(24 / r["duration"])
    assert r["max_concurrent_requests"] <= 2
    assert r["model_id"] == "fake-model" and r["request_rate"] == "inf"
    assert r["num_prompts"] == 6 and r["max_concurrency"] == 2


def test_serve_poisson_rate_spreads_requests(tmp_path):
    fake = FakeOpenAIServer()
    with serving(fake.app) as url:
        r = run_bench_serve(
            url, tmp_path / "r.json",
            "--num-prompts", "8", "--random-input-len", "4", "--random-output-len", "2",
            "--request-rate", "20", "--seed", "1",
        )  # fmt: skip
    starts = sorted(r["start_times"])
    # Arrivals are rescaled so the last is sent at n / rate = 0.4 s after the first send slot.
    assert 0.3 < starts[-1] - starts[0] < 0.6
    assert r["request_rate"] == 20.0 and r["completed"] == 8


def test_serve_reports_http_errors_as_failed_requests(tmp_path):
    calls = []

    async def completions(request: Request) -> JSONResponse:
        calls.append(1)
        if len(calls) == 1:  # the test request succeeds, then the server fails
            return StreamingResponse(
                iter(['data: {"choices": [{"text": "x"}]}\n\n', "data: [DONE]\n\n"]),
                media_type="text/event-stream",
            )
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    with serving(app) as url:
        r = run_bench_serve(url, tmp_path / "r.json", "--model", "m", "--num-prompts", "3")
    assert (r["completed"], r["failed"]) == (0, 3)
    assert all(e.startswith("HTTP 500") and "boom" in e for e in r["errors"])


def test_serve_against_pagejax_server(tmp_path):
    """The real app (`api/server.py`) around a tiny engine: every request completes with the
    asked-for tokens, streamed, with ITLs that add up to each request's latency."""
    from api.server import build_app
    from api.serving import ServerConfig
    from engine.async_engine import AsyncEngine
    from engine.llm import build_engine_config
    from engine.llm_engine import LLMEngine
    from tests.hf_models import write_checkpoint

    model = write_checkpoint("llama2_tied", tmp_path / "model")
    config = build_engine_config(
        str(model),
        skip_tokenizer_init=True,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=128,
        num_pages=64,
        page_size=8,
        token_buckets=(32,),
    )
    engine = AsyncEngine(engine=LLMEngine(config))
    try:
        with serving(build_app(engine, ServerConfig(served_model_names=("tiny",)))) as url:
            r = run_bench_serve(
                url, tmp_path / "r.json",
                "--num-prompts", "6", "--random-input-len", "12", "--random-output-len", "5",
                "--ignore-eos", "--random-vocab-size", "320",
            )  # fmt: skip
    finally:
        engine.shutdown()
    assert (r["completed"], r["failed"], r["model_id"]) == (6, 0, "tiny")
    assert r["input_lens"] == [12] * 6 and r["output_lens"] == [5] * 6
    # A chunk per token, unless the server fell behind and merged two steps' tokens into one.
    assert all(1 <= len(itls) <= 4 for itls in r["itls"])
    for ttft, itls, latency in zip(r["ttfts"], r["itls"], r["latencies"], strict=True):
        assert ttft + sum(itls) == pytest.approx(latency, abs=1e-6)
    assert r["mean_tpot_ms"] > 0 and r["mean_ttft_ms"] > 0
