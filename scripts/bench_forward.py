"""Device time of one decode step without the engine's host work: the forward and sampler
executables, as the engine compiled them, called back to back on one captured step input.

    python scripts/bench_forward.py --model scripts/configs/llama-3.1-8b --load-format dummy \
        --batch 64 --context 640 --output-json forward.json

Fills `--batch` requests of `--context` prompt tokens, steps the engine until every request
decodes, captures the input of one decode step, and times (each `--reps` times):
- `forward_ms`: the forward executable `--iters` times back to back, the KV cache and row
  state threaded through as the engine threads them (the same step recomputed: its context
  stays at `--context` plus the steps taken);
- `forward_sampler_ms`: the forward and the sampler, as an engine step dispatches them;
- `host_ms_per_forward`: the host time of one forward call while the device is idle
  (argument handling, XLA's command-buffer update, the launch).
The engine's step time (`pagejax bench latency`; `PAGEJAX_STEP_TRACE` for its host share) minus
`forward_sampler_ms` is what the host adds to a step. `PAGEJAX_GPU_GEMM` is read as the CLI
reads it. The script reaches into the runner's executable tables (`_forward`, `_sampler`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm import tqdm


@dataclasses.dataclass
class CapturedStep:
    """One decode step as the engine dispatched it: its executables and their inputs."""

    forward: Callable
    model_buf: jax.Array
    sampler: Callable
    sample_buf: jax.Array
    shape: dict  # step_tokens, step_requests, bucket [T, R]


def capture_decode_step(llm, batch: int, context: int, temperature: float) -> CapturedStep:
    """Step the engine until `batch` requests of `context` tokens all decode, then capture
    the next step it dispatches (the runner's executables are wrapped for that one step)."""
    from engine import SamplingParams

    eng = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=temperature, max_tokens=1 << 20, ignore_eos=True)
    vocab = min(20000, eng.model_config.vocab_size)
    for i in range(batch):
        prompt = rng.integers(0, vocab, context).tolist()
        eng.add_request(f"f{i}", {"prompt_token_ids": prompt}, params)
    with tqdm(desc="prefilling", total=batch * context, leave=False) as bar:
        while any(
            r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()
        ):
            eng.step()
            bar.n = sum(r.num_computed_tokens for r in eng.scheduler.requests.values())
            bar.refresh()
    for _ in range(3):  # past the steps that still carry prompt tokens (async scheduling)
        eng.step()
    runner, seen = eng.runner, {}
    tables = {"forward": runner._forward, "sampler": runner._sampler}
    saved = {name: dict(table) for name, table in tables.items()}

    def spy(name: str, fn: Callable) -> Callable:
        def call(*args):
            seen[name] = (fn, args[-1])  # the step's input buffer is the last argument
            return fn(*args)

        return call

    for name, table in tables.items():
        table.update({key: spy(name, fn) for key, fn in table.items()})
    schedule = eng.scheduler.schedule

    def recorded_schedule():
        seen["sched"] = schedule()
        return seen["sched"]

    eng.scheduler.schedule = recorded_schedule
    try:
        eng.step()
    finally:
        for name, table in tables.items():
            table.update(saved[name])
        del eng.scheduler.schedule  # the class's method again
    step = seen["sched"]
    if step.num_batched_tokens != batch or len(step.requests) != batch:
        raise RuntimeError(f"captured a step of {step.num_batched_tokens} tokens, not a decode")
    layout = runner.layout_for(step)
    shape = {
        "step_tokens": step.num_batched_tokens,
        "step_requests": len(step.requests),
        "bucket": [layout.num_tokens, layout.num_requests],
    }
    return CapturedStep(*seen["forward"], *seen["sampler"], shape)


def time_step(llm, step: CapturedStep, *, iters: int, reps: int) -> dict:
    """forward_ms, forward_sampler_ms (`reps` runs of `iters` calls) and host_ms_per_forward;
    the runner's KV cache and row state are threaded through and written back."""
    runner = llm.engine.runner
    state = {"kv": runner.kv_caches, "rows": runner.rows_state}

    def call(with_sampler: bool) -> None:
        state["kv"], state["rows"], logits, _ = step.forward(
            runner.params, state["kv"], state["rows"], step.model_buf
        )
        if with_sampler:
            state["rows"], _ = step.sampler(state["rows"], logits, step.sample_buf)

    def idle() -> None:
        jax.block_until_ready((state["kv"], state["rows"]))

    def ms_per_call(with_sampler: bool) -> float:
        idle()
        start = time.perf_counter()
        for _ in range(iters):
            call(with_sampler)
        idle()
        return 1e3 * (time.perf_counter() - start) / iters

    result = {}
    for name, with_sampler in (("forward_ms", False), ("forward_sampler_ms", True)):
        ms_per_call(with_sampler)  # warm: the first calls update the command buffers
        result[name] = [round(ms_per_call(with_sampler), 3) for _ in range(reps)]
    host = []
    for _ in range(5 + 4 * reps):
        idle()
        start = time.perf_counter()
        call(False)
        host.append(1e3 * (time.perf_counter() - start))
    idle()
    result["host_ms_per_forward"] = round(statistics.median(host[5:]), 3)
    runner.kv_caches, runner.rows_state = state["kv"], state["rows"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=640)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output-json", required=True)
    args = ap.parse_args()
    from engine import LLM
    from engine.config import parse_gpu_gemm

    b = args.batch
    llm = LLM(
        args.model,
        load_format=args.load_format,
        skip_tokenizer_init=True,
        max_num_seqs=b,
        enable_prefix_caching=False,
        max_num_batched_tokens=max(2048, b),
        max_model_len=args.context + 512,
        token_buckets=tuple(sorted({max(16, b), max(2048, b)})),
        request_buckets=(max(8, b),),
        cublas_min_tokens=parse_gpu_gemm(os.environ.get("PAGEJAX_GPU_GEMM", "auto")),
    )
    step = capture_decode_step(llm, b, args.context, args.temperature)
    result = {"batch": b, "context": args.context, "iters": args.iters, **step.shape}
    result |= time_step(llm, step, iters=args.iters, reps=args.reps)
    result.update(
        device=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
        model=args.model,
        cublas_min_tokens=llm.engine.config.compile.cublas_min_tokens,
    )
    print(json.dumps(result), flush=True)
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
