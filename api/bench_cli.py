"""`pagejax bench {throughput,latency,serve}`: vLLM's benchmark commands, on pagejax.

`throughput` and `latency` run the offline engine in this process; `serve` is an HTTP client for
any OpenAI-compatible server (pagejax or vLLM). The implementations live in `api/bench/`.
"""

from __future__ import annotations

import argparse

from api.bench import latency, serve, throughput


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` and its three commands on the `pagejax` parser."""
    bench = subparsers.add_parser("bench", help="benchmarks (vLLM's `vllm bench` commands)")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    throughput.add_cli_args(
        commands.add_parser(
            "throughput", help="offline throughput of random prompts of fixed length"
        )
    )
    latency.add_cli_args(
        commands.add_parser("latency", help="end-to-end latency of one batch, repeated")
    )
    serve.add_cli_args(
        commands.add_parser("serve", help="stream completions from an OpenAI-compatible server")
    )
