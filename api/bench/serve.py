"""`pagejax bench serve`: an async client that streams completions from any OpenAI-compatible
server (pagejax or vLLM) at a Poisson request rate and reports TTFT, TPOT, ITL, E2EL, throughput
and goodput, with `vllm bench serve`'s flags, metric definitions and result JSON keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from api.bench.datasets import SampleRequest, sample_random_requests
from api.bench.offline import has_tokenizer, write_json
from api.bench.serve_metrics import (
    METRIC_NAMES,
    RequestResult,
    ServeMetrics,
    calculate_metrics,
    parse_goodput,
    percentile_word,
    result_dict,
)

# A request may wait in the server's queue for as long as the run lasts: only connecting is bounded.
_CONNECT_TIMEOUT_S = 60.0


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """vLLM's `bench serve` flags (the `random` dataset and the completions endpoint)."""
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer for text prompts")
    p.add_argument("--label", default=None, help="result file prefix (default: openai)")
    p.add_argument("--dataset-name", default="random", choices=["random"])
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument(
        "--random-vocab-size",
        type=int,
        default=32000,
        help="token ids are drawn below this when there is no tokenizer",
    )
    p.add_argument("--token-id-prompts", action="store_true", help="send ids even with a tokenizer")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="req/s; inf = all")
    p.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson arrivals")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=None, help="default: the server's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="ttft/tpot/e2el")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--disable-tqdm", action="store_true")
    p.set_defaults(func=main)


@dataclass
class StreamTimer:
    """Timestamps of one streamed completion, fed line by line from the SSE stream."""

    start: float
    ttft: float | None = None
    last: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    num_chunks: int = 0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None

    def feed(self, line: str, now: float) -> None:
        """One SSE line: `data: {json}` chunks count; comments, blanks and [DONE] do not."""
        line = line.strip()
        if not line.startswith("data:"):
            return
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if choices := chunk.get("choices"):
            if self.ttft is None:
                self.ttft = now - self.start
            else:
                self.itl.append(now - self.last)
            self.last = now
            self.num_chunks += 1
            self.text.append(choices[0].get("text") or "")
        if usage := chunk.get("usage"):
            self.completion_tokens = usage.get("completion_tokens")
            self.prompt_tokens = usage.get("prompt_tokens")

    def result(self, prompt_len: int, tokenizer: Any | None) -> RequestResult:
        """The request's timings; output tokens from `usage`, else the tokenizer, else chunks."""
        text = "".join(self.text)
        if self.ttft is None:
            return RequestResult(False, prompt_len, start_time=self.start, error="no content chunk")
        tokens = self.completion_tokens
        if not tokens:
            tokens = (
                len(tokenizer.encode(text, add_special_tokens=False))
                if tokenizer is not None
                else self.num_chunks
            )
        return RequestResult(
            success=True,
            prompt_len=self.prompt_tokens or prompt_len,
            output_tokens=tokens,
            ttft=self.ttft,
            itl=tuple(self.itl),
            latency=self.last - self.start,
            start_time=self.start,
            generated_text=text,
        )


def build_payload(
    model: str, request: SampleRequest, ignore_eos: bool, temperature: float | None
) -> dict[str, Any]:
    """The streamed completions request body (vLLM's client sends the same fields)."""
    payload: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.expected_output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True
    if temperature is not None:
        payload["temperature"] = temperature
    return payload


async def send_request(
    client: Any, api_url: str, payload: dict[str, Any], prompt_len: int, tokenizer: Any | None
) -> RequestResult:
    """POST one streamed completion and time its chunks; errors become a failed result."""
    timer = StreamTimer(start=time.perf_counter())
    try:
        async with client.post(api_url, json=payload) as response:
            if response.status != 200:
                body = (await response.read()).decode(errors="replace")[:500]
                error = f"HTTP {response.status}: {body}"
                return RequestResult(False, prompt_len, start_time=timer.start, error=error)
            async for line in response.content:  # one SSE line at a time, as it arrives
                timer.feed(line.decode(), time.perf_counter())
    except Exception as e:  # recorded per request and reported, as vLLM's client does
        return RequestResult(False, prompt_len, start_time=timer.start, error=repr(e))
    return timer.result(prompt_len, tokenizer)


def arrival_offsets(
    rng: np.random.Generator, n: int, request_rate: float, burstiness: float
) -> np.ndarray:
    """Send times [n] (s from the start): all 0 at an infinite rate, else gamma-distributed gaps
    (exponential = Poisson at burstiness 1) rescaled so the last one is at n / rate, as vLLM."""
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if math.isinf(request_rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    return offsets * (n / request_rate) / offsets[-1]


async def run_requests(
    client: Any,
    api_url: str,
    payloads: list[tuple[dict[str, Any], int]],
    offsets: np.ndarray,
    max_concurrency: int | None,
    tokenizer: Any | None,
    disable_tqdm: bool = False,
) -> tuple[list[RequestResult], float]:
    """Send (payload, prompt_len) pairs at `offsets`; returns (results in order, duration s)."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(payloads), disable=disable_tqdm)

    async def one(payload: dict[str, Any], prompt_len: int) -> RequestResult:
        async with limit:
            result = await send_request(client, api_url, payload, prompt_len, tokenizer)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for (payload, prompt_len), offset in zip(payloads, offsets, strict=True):
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(one(payload, prompt_len)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def first_model_id(client: Any, base_url: str) -> str:
    """The first model id the server lists at /v1/models."""
    import aiohttp

    try:
        async with client.get(f"{base_url}/v1/models", raise_for_status=True) as response:
            body = await response.json(content_type=None)  # whatever the server labels it
    except aiohttp.ClientError as e:
        raise ValueError(f"cannot list models at {base_url}/v1/models ({e!r}); pass --model") from e
    data = body.get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


def load_tokenizer_for(args: argparse.Namespace) -> Any | None:
    """A tokenizer for text prompts: --tokenizer, else --model when it is a local path, else
    None (token id prompts)."""
    from models.tokenizer import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if args.model is not None and Path(args.model).exists() and has_tokenizer(args.model):
        return load_tokenizer(args.model)
    return None


def print_summary(metrics: ServeMetrics, duration: float, args: argparse.Namespace) -> None:
    """vLLM's result table."""
    row = lambda label, value: print(f"{label:<40} {value:<10.2f}")
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    print(f"{'Successful requests:':<40} {metrics.completed:<10}")
    print(f"{'Failed requests:':<40} {metrics.failed:<10}")
    if args.max_concurrency is not None:
        print(f"{'Maximum request concurrency:':<40} {args.max_concurrency:<10}")
    row("Benchmark duration (s):", duration)
    print(f"{'Total input tokens:':<40} {metrics.total_input:<10}")
    print(f"{'Total generated tokens:':<40} {metrics.total_output:<10}")
    row("Request throughput (req/s):", metrics.request_throughput)
    if args.goodput:
        row("Request goodput (req/s):", metrics.request_goodput)
    row("Output token throughput (tok/s):", metrics.output_throughput)
    row("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s)
    row("Peak concurrent requests:", metrics.max_concurrent_requests)
    row("Total token throughput (tok/s):", metrics.total_token_throughput)
    headers = {
        "ttft": ("TTFT", "Time to First Token"),
        "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
        "itl": ("ITL", "Inter-token Latency"),
        "e2el": ("E2EL", "End-to-end Latency"),
    }
    for name in METRIC_NAMES:
        if name not in args.percentile_metrics.split(","):
            continue
        short, header = headers[name]
        s = metrics.stats[name]
        print("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", s.mean)
        row(f"Median {short} (ms):", s.median)
        for p, value in s.percentiles:
            row(f"P{percentile_word(p)} {short} (ms):", value)
    print("=" * 50)


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Check the server with one request, run the benchmark, print and return vLLM's result."""
    import aiohttp

    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    slos = parse_goodput(args.goodput)
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    tokenizer = load_tokenizer_for(args)
    rng = np.random.default_rng(args.seed)
    requests = sample_random_requests(
        rng,
        num_prompts=args.num_prompts,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        tokenizer=None if args.token_id_prompts else tokenizer,
        vocab_size=args.random_vocab_size,
    )
    offsets = arrival_offsets(rng, len(requests), args.request_rate, args.burstiness)
    # aiohttp, as vLLM's client: httpx's connection pool scans every open connection each time
    # a request starts or a response closes (quadratic in the streams), which at 200 streams
    # made the client, not the server, the bottleneck.
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0, keepalive_timeout=60)
    api_key = os.environ.get("OPENAI_API_KEY")  # as vLLM's client
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    # trust_env=False: no proxy between the client and the server it times.
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT_S),
        headers=headers,
        trust_env=False,
        read_bufsize=1 << 20,  # SSE lines up to twice this are read whole; longer fail the request
    ) as client:
        model = args.model or await first_model_id(client, base_url)
        api_url = base_url + args.endpoint
        payloads = [
            (build_payload(model, r, args.ignore_eos, args.temperature), r.prompt_len)
            for r in requests
        ]
        probe = await send_request(client, api_url, *payloads[0], tokenizer)
        if not probe.success:
            raise ValueError(f"the test request to {api_url} failed: {probe.error}")
        results, duration = await run_requests(
            client, api_url, payloads, offsets, args.max_concurrency, tokenizer, args.disable_tqdm
        )
    metrics = calculate_metrics(results, duration, percentiles, slos)
    for i, r in enumerate([r for r in results if not r.success][:10]):
        print(f"Error {i}: {r.error}")
    print_summary(metrics, duration, args)
    body = result_dict(metrics, results, duration, args.percentile_metrics.split(","), bool(slos))
    return {"model_id": model, **body}


def result_path(args: argparse.Namespace, model_id: str, date: str) -> Path:
    """vLLM's file name: {label}-{rate}qps[-concurrency{c}]-{model}-{date}.json."""
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    name = args.result_filename or (
        f"{args.label or 'openai'}-{args.request_rate}qps{concurrency}-"
        f"{model_id.split('/')[-1]}-{date}.json"
    )
    return Path(args.result_dir or ".") / name


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; with --save-result write vLLM's result JSON."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = asyncio.run(benchmark(args))
    if args.save_result or args.result_filename:
        header = {
            "date": date,
            "endpoint_type": "openai",
            "backend": "openai",
            "label": args.label,
            "model_id": result["model_id"],
            "tokenizer_id": args.tokenizer or args.model,
            "num_prompts": args.num_prompts,
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency,
        }
        write_json(result_path(args, result["model_id"], date), {**header, **result})
    return 0
