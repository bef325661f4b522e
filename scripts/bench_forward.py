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
`forward_sampler_ms` is what the host adds to a step. `PAGEJAX_GPU_GEMM` and the other settings
of engine/config.py apply as in the engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np


def _capture_decode_input(llm, batch: int, context: int, temperature: float):
    """Step the engine until `batch` requests of `context` tokens all decode; then, of the next
    step it dispatches, (forward, its input), (sampler, its input) and the step's shape."""
    from engine import SamplingParams

    eng = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=temperature, max_tokens=1 << 20, ignore_eos=True)
    vocab = min(20000, eng.model_config.vocab_size)
    for i in range(batch):
        prompt = rng.integers(0, vocab, context).tolist()
        eng.add_request(f"f{i}", {"prompt_token_ids": prompt}, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
        eng.step()
    for _ in range(3):  # past the steps that still carry prompt tokens (async scheduling)
        eng.step()
    runner, seen = eng.runner, {}
    forwards, samplers = dict(runner._forward), dict(runner._sampler)

    def spy(table, key, fn, name):
        def call(*args):
            seen[name] = (fn, args[-1])
            return fn(*args)

        table[key] = call

    for key, fn in forwards.items():
        spy(runner._forward, key, fn, "forward")
    for key, fn in samplers.items():
        spy(runner._sampler, key, fn, "sampler")
    sched = eng.scheduler.schedule  # the step's size, to check it is a decode step
    eng.scheduler.schedule = lambda: seen.setdefault("sched", sched())
    try:
        eng.step()
    finally:
        runner._forward.update(forwards)
        runner._sampler.update(samplers)
        del eng.scheduler.schedule
    step = seen["sched"]
    layout = runner.layout_for(step)
    shape = {
        "step_tokens": step.num_batched_tokens,
        "step_requests": len(step.requests),
        "bucket": [layout.num_tokens, layout.num_requests],
    }
    return seen["forward"], seen["sampler"], shape


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
    )
    (forward, model_buf), (sampler, sample_buf), shape = _capture_decode_input(
        llm, b, args.context, args.temperature
    )
    runner = llm.engine.runner
    state = {"kv": runner.kv_caches, "rows": runner.rows_state}

    def step(with_sampler: bool):
        state["kv"], state["rows"], logits, _ = forward(
            runner.params, state["kv"], state["rows"], model_buf
        )
        if with_sampler:
            state["rows"], _ = sampler(state["rows"], logits, sample_buf)

    def ms_per_call(with_sampler: bool) -> float:
        jax.block_until_ready(state["kv"])
        start = time.perf_counter()
        for _ in range(args.iters):
            step(with_sampler)
        jax.block_until_ready((state["kv"], state["rows"]))
        return 1e3 * (time.perf_counter() - start) / args.iters

    result = {"batch": b, "context": args.context, "iters": args.iters, **shape}
    for name, with_sampler in (("forward_ms", False), ("forward_sampler_ms", True)):
        ms_per_call(with_sampler)  # warm: the first calls update the command buffers
        result[name] = [round(ms_per_call(with_sampler), 3) for _ in range(args.reps)]
    host = []
    for _ in range(5 + 4 * args.reps):
        jax.block_until_ready((state["kv"], state["rows"]))
        start = time.perf_counter()
        step(False)
        host.append(1e3 * (time.perf_counter() - start))
    jax.block_until_ready(state["kv"])
    result["host_ms_per_forward"] = round(statistics.median(host[5:]), 3)
    runner.kv_caches, runner.rows_state = state["kv"], state["rows"]
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
