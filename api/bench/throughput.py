"""`pagejax bench throughput`: offline throughput of random prompts of fixed length, all queued at
once, as `vllm bench throughput --dataset-name random` (same result JSON keys)."""

from __future__ import annotations

import argparse
from typing import Any

from api.bench.offline import (
    add_offline_args,
    environment_info,
    json_args,
    prepare_run,
    run_batch,
    write_json,
)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """Flags of `bench throughput` (vLLM's defaults for the random dataset)."""
    add_offline_args(p, input_len=1024, output_len=128)
    p.add_argument("--num-prompts", type=int, default=1000, help="requests to run")
    p.set_defaults(func=main)


def throughput_result(
    elapsed: float, num_requests: int, num_prompt_tokens: int, num_output_tokens: int
) -> dict[str, Any]:
    """vLLM's throughput JSON keys (`tokens_per_second` counts prompt + output tokens), plus the
    output-only rate and the token counts."""
    total = num_prompt_tokens + num_output_tokens
    return {
        "elapsed_time": elapsed,
        "num_requests": num_requests,
        "total_num_tokens": total,
        "requests_per_second": num_requests / elapsed,
        "tokens_per_second": total / elapsed,
        "output_tokens_per_second": num_output_tokens / elapsed,
        "num_prompt_tokens": num_prompt_tokens,
        "num_output_tokens": num_output_tokens,
    }


def main(args: argparse.Namespace) -> int:
    """Start the engine, run `--num-prompts` requests, print and save the figures."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    engine, startup, prompts, params = prepare_run(args, args.num_prompts)
    run = run_batch(
        engine,
        prompts,
        params,
        desc=None if args.disable_tqdm else "requests",
        first_token_times=False,
    )
    num_prompt = sum(len(o.prompt_token_ids) for o in run.outputs)
    num_output = sum(len(c.token_ids) for o in run.outputs for c in o.outputs)
    result = throughput_result(run.elapsed, len(run.outputs), num_prompt, num_output)
    result.update(
        startup_time=startup,
        num_kv_pages=engine.allocator.num_pages,
        num_preemptions=engine.scheduler.num_preemptions,
        **environment_info(),
        args=json_args(args),
    )
    print(f"Engine start-up: {startup:.2f} s (not timed below)")
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s"
    )
    print(f"Total num prompt tokens:  {num_prompt}")
    print(f"Total num output tokens:  {num_output}")
    print(f"KV cache pages: {result['num_kv_pages']}, preemptions: {result['num_preemptions']}")
    if args.output_json:
        write_json(args.output_json, result)
    return 0
