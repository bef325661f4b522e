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
  (argument handling, XLA's command-buffer update, the launch);
- with `--profile DIR`, `profile`: `--iters` steps traced, device time a step by kernel kind
  and name (scripts/trace_step.py's summary; a per-layer kernel's time over the number of
  layers is the per-launch figure that docs/BENCHMARKS.md's tenth session quotes).
The step runs in the (tokens, requests) bucket a server with the default ladders and
`--max-num-seqs` (default 256, the server's) gives it: 16 x 16 for 1-16 decodes, 32 x 32 for
17-32. (Until the sixteenth session the tool ran up to 8 decodes in a 16 x 8 bucket, which
only a user's request ladder runs.)
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
    from trace_step import fill_decoding  # a sibling script: scripts/ is on sys.path

    fill_decoding(llm, batch, context, temperature)
    eng = llm.engine
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
    layout = runner.buckets.layout_for(step)
    shape = {
        "step_tokens": step.num_batched_tokens,
        "step_requests": len(step.requests),
        "bucket": [layout.num_tokens, layout.num_requests],
    }
    return CapturedStep(*seen["forward"], *seen["sampler"], shape)


class StepLoop:
    """Calls a captured step's executables back to back, threading the runner's KV cache and
    row state through them as the engine does (`write_back` returns them to the runner)."""

    def __init__(self, llm, step: CapturedStep):
        self.runner, self.step = llm.engine.runner, step
        self.kv, self.rows = self.runner.kv_caches, self.runner.rows_state

    def call(self, with_sampler: bool) -> None:
        step = self.step
        self.kv, self.rows, logits, _ = step.forward(
            self.runner.params, self.kv, self.rows, step.model_buf
        )
        if with_sampler:
            self.rows, _ = step.sampler(self.rows, logits, step.sample_buf)

    def idle(self) -> None:
        jax.block_until_ready((self.kv, self.rows))

    def ms_per_call(self, iters: int, with_sampler: bool) -> float:
        self.idle()
        start = time.perf_counter()
        for _ in range(iters):
            self.call(with_sampler)
        self.idle()
        return 1e3 * (time.perf_counter() - start) / iters

    def host_ms(self, calls: int) -> float:
        """Median host time of one forward call with the device idle (5 calls to warm up)."""
        times = []
        for _ in range(5 + calls):
            self.idle()
            start = time.perf_counter()
            self.call(False)
            times.append(1e3 * (time.perf_counter() - start))
        self.idle()
        return statistics.median(times[5:])

    def write_back(self) -> None:
        self.runner.kv_caches, self.runner.rows_state = self.kv, self.rows


def time_step(loop: StepLoop, *, iters: int, reps: int) -> dict:
    """forward_ms and forward_sampler_ms (`reps` runs of `iters` calls), host_ms_per_forward."""
    result = {}
    for name, with_sampler in (("forward_ms", False), ("forward_sampler_ms", True)):
        loop.ms_per_call(iters, with_sampler)  # warm: the first calls update command buffers
        result[name] = [round(loop.ms_per_call(iters, with_sampler), 3) for _ in range(reps)]
    result["host_ms_per_forward"] = round(loop.host_ms(4 * reps), 3)
    return result


def profile_step(loop: StepLoop, folder: str, *, iters: int, num_layers: int) -> dict:
    """`iters` forward + sampler calls under the JAX profiler (a Perfetto trace in `folder`),
    summarised per call by scripts/trace_step.py: device time by kernel kind and name."""
    from trace_step import newest_trace, summarize  # a sibling script: scripts/ is on sys.path

    loop.idle()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(iters):
            loop.call(True)
        loop.idle()
    trace = newest_trace(folder)
    if trace is None:
        return {"error": "no perfetto trace"}
    summary = summarize(trace, iters, num_layers)
    keep = ("steps", "device_busy_ms_per_step", "device_span_ms_per_step")
    keep += ("num_kernels_per_step", "kernel_kinds_ms_per_step", "top_kernels_ms_per_step")
    return {key: summary[key] for key in keep}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=640)
    ap.add_argument(
        "--max-num-seqs", type=int, default=256, help="the request ladder's top (a server's 256)"
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--profile", help="also trace --iters steps into this folder: device time by kernel"
    )
    ap.add_argument("--output-json", required=True)
    args = ap.parse_args()
    from bench_kernels import engine_decode_buckets  # a sibling script: scripts/ is on sys.path

    from engine import LLM
    from engine.config import bucket_ladder, parse_gpu_gemm

    b = args.batch
    # The buckets a server runs this decode batch in (`engine_decode_buckets`: its default
    # ladders): the token rung that holds the batch, and the request ladder of
    # `--max-num-seqs`, from which the runner picks the step's request rung (16 for 1-16
    # decodes with the server's 256). Only that token rung and 2,048 are compiled.
    max_seqs = max(args.max_num_seqs, b)
    rung, _ = engine_decode_buckets(b, max_seqs, budget=max(8192, b))
    llm = LLM(
        args.model,
        load_format=args.load_format,
        tensor_parallel_size=args.tensor_parallel_size,
        skip_tokenizer_init=True,
        max_num_seqs=max_seqs,
        enable_prefix_caching=False,
        max_num_batched_tokens=max(2048, rung),
        max_model_len=args.context + 512,
        token_buckets=tuple(sorted({rung, max(2048, rung)})),
        request_buckets=bucket_ladder(8, max_seqs),
        cublas_min_tokens=parse_gpu_gemm(os.environ.get("PAGEJAX_GPU_GEMM", "auto")),
    )
    step = capture_decode_step(llm, b, args.context, args.temperature)
    result = {"batch": b, "context": args.context, "iters": args.iters, **step.shape}
    loop = StepLoop(llm, step)
    result |= time_step(loop, iters=args.iters, reps=args.reps)
    if args.profile:
        num_layers = llm.engine.model_config.num_layers
        result["profile"] = profile_step(
            loop, args.profile, iters=args.iters, num_layers=num_layers
        )
    loop.write_back()
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
