"""`pagejax bench latency`: end-to-end latency of one batch of requests, repeated, as
`vllm bench latency` (same JSON keys: `avg_latency`, `latencies`, `percentiles`), plus the
time to first token of the batch and the time of one decode step."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from api.bench.offline import (
    add_offline_args,
    environment_info,
    json_args,
    prepare_run,
    run_batch,
    write_json,
)

PERCENTAGES = (10, 25, 50, 75, 90, 99)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """Flags of `bench latency` (vLLM's defaults)."""
    add_offline_args(p, input_len=32, output_len=128)
    p.add_argument("--batch-size", type=int, default=8, help="requests per iteration")
    p.add_argument("--num-iters-warmup", type=int, default=10, help="untimed iterations first")
    p.add_argument("--num-iters", type=int, default=30, help="timed iterations")
    p.set_defaults(func=main)


def latency_result(
    latencies: Sequence[float], ttfts: Sequence[float], batch_size: int, output_len: int
) -> dict[str, Any]:
    """Summary of timed iterations (seconds in, vLLM's keys out).

    latencies: [I] seconds per iteration; ttfts: [I] seconds until every request of the
    iteration had its first token. Each step gives every request one token, so
    `avg_ms_per_output_token` (latency / output_len, prefill amortised) is also the mean step
    time, and `avg_ms_per_decode_step` ((latency - ttft) / (output_len - 1)) excludes the prefill.
    """
    lat = np.asarray(latencies, dtype=np.float64)
    ttft = np.asarray(ttfts, dtype=np.float64)
    avg = float(np.mean(lat))
    percentiles = np.percentile(lat, PERCENTAGES).tolist()
    decode = None
    if output_len > 1:
        decode = float(np.mean((lat - ttft) / (output_len - 1))) * 1000
    return {
        "avg_latency": avg,
        "latencies": lat.tolist(),
        "percentiles": dict(zip(PERCENTAGES, percentiles, strict=True)),
        "avg_ttft": float(np.mean(ttft)),
        "avg_ms_per_output_token": avg * 1000 / output_len,
        "avg_ms_per_decode_step": decode,
        "output_tokens_per_second": batch_size * output_len / avg,
        "batch_size": batch_size,
        "output_len": output_len,
    }


def main(args: argparse.Namespace) -> int:
    """Start the engine, run warm-up then timed iterations, print and save the figures."""
    if args.batch_size < 1 or args.num_iters < 1 or args.num_iters_warmup < 0:
        raise ValueError("--batch-size and --num-iters must be at least 1")
    engine, startup, prompts, params = prepare_run(args, args.batch_size)
    for _ in tqdm(range(args.num_iters_warmup), "Warmup iterations", disable=args.disable_tqdm):
        run_batch(engine, prompts, params)
    runs = [
        run_batch(engine, prompts, params)
        for _ in tqdm(range(args.num_iters), "Timed iterations", disable=args.disable_tqdm)
    ]
    latencies, ttfts = [r.elapsed for r in runs], [r.ttft for r in runs]
    result = latency_result(latencies, ttfts, args.batch_size, args.output_len)
    result.update(startup_time=startup, **environment_info(), args=json_args(args))
    print(f"Engine start-up: {startup:.2f} s (not timed below)")
    print(f"Avg latency: {result['avg_latency']:.4f} seconds")
    for p, value in result["percentiles"].items():
        print(f"{p}% percentile latency: {value:.4f} seconds")
    print(f"Avg time to first token (whole batch): {result['avg_ttft'] * 1000:.2f} ms")
    print(f"Avg ms per output token: {result['avg_ms_per_output_token']:.2f}")
    if result["avg_ms_per_decode_step"] is not None:
        print(f"Avg ms per decode step: {result['avg_ms_per_decode_step']:.2f}")
    if args.output_json:
        write_json(args.output_json, result)
    return 0
