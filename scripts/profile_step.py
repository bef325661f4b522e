"""Where a decode step's time goes: host work, dispatch, device time, vs the HBM roofline.

    python scripts/profile_step.py --model scripts/configs/llama-3.1-8b --batch 1 64

For each batch size: fills the engine with `batch` requests at decode, then times
  - `engine.step()` end to end (as `LLM.generate` runs it: finished outputs only),
  - the host part alone (schedule + build the packed input),
  - the compiled step alone, called back to back on one input (device time + dispatch),
and prints one JSON line each, with the weight-streaming roofline for comparison.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def profile(llm, batch: int, input_len: int, reps: int) -> dict:
    from engine import SamplingParams
    from engine.outputs import OutputKind
    from engine.step_fns import GREEDY
    from engine.step_input import build_step_input

    eng = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for i in range(batch):
        eng.add_request(
            f"p{batch}-{i}",
            {
                "prompt_token_ids": rng.integers(
                    0, min(20000, eng.model_config.vocab_size), input_len
                ).tolist()
            },
            params,
        )
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
        eng.step()
    for _ in range(3):
        eng.step()
    step_ms = _median_ms(lambda: eng.step(kind=OutputKind.FINAL_ONLY), reps)

    runner = eng.runner
    sched = eng.scheduler.schedule()
    rows = [runner._row_for(r) for r in sched.requests]
    seeds = [runner._seeds[r.request_id] for r in sched.requests]
    layout = runner.buckets.layout_for(sched)
    build = lambda: build_step_input(
        sched,
        layout,
        page_size=runner.page_size,
        rows=rows,
        seeds=seeds,
        scratch_row=runner.scratch_row,
    )
    host_build_ms = _median_ms(build, reps)
    schedule_ms = _median_ms(
        lambda: eng.scheduler._scheduled_request(
            eng.scheduler.requests[sched.requests[0].request_id], 1
        ),
        reps,
    ) * len(sched.requests)
    bufs = build()
    model_buf, sample_buf = jax.device_put([bufs.model, bufs.sample])
    forward = runner._forward[layout]
    sampler = runner._sampler[layout.num_requests, GREEDY]

    def step_once():
        runner.kv_caches, runner.rows_state, logits, _ = forward(
            runner.params, runner.kv_caches, runner.rows_state, model_buf
        )
        runner.rows_state, res = sampler(runner.rows_state, logits, sample_buf)
        return logits, res

    def device_loop(n=20, sample=True):
        for _ in range(n):
            logits, res = step_once() if sample else (step_once()[0], None)
        jax.block_until_ready(logits)

    device_loop(3)
    device_ms = _median_ms(device_loop, 5) / 20
    t = time.perf_counter()
    for _ in range(20):
        logits, res = step_once()
    dispatch_ms = (time.perf_counter() - t) * 1e3 / 20
    jax.block_until_ready(res.sampled_ids)
    for rid in list(eng.scheduler.requests):
        eng.abort_request(rid)
    eng.step()
    return dict(
        batch=batch,
        layout=[layout.num_tokens, layout.num_requests],
        engine_step_ms=round(step_ms, 3),
        device_step_ms=round(device_ms, 3),
        host_build_ms=round(host_build_ms, 3),
        dispatch_ms=round(dispatch_ms, 3),
        schedule_est_ms=round(schedule_ms, 3),
        num_param_leaves=len(jax.tree.leaves(runner.params)),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--attention-backend", default="auto")
    args = ap.parse_args()
    from engine import LLM

    mx = max(args.batch)
    llm = LLM(
        args.model,
        load_format="dummy",
        skip_tokenizer_init=True,
        attention_backend=args.attention_backend,
        max_num_seqs=max(8, mx),
        max_num_batched_tokens=2048,
        max_model_len=args.input_len + 1024,
        token_buckets=tuple(sorted({16, *[max(16, b) for b in args.batch], 2048})),
        request_buckets=tuple(sorted({8, *[max(8, b) for b in args.batch]})),
    )
    cfg = llm.engine.model_config
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(llm.engine.runner.params))
    for b in args.batch:
        out = profile(llm, b, args.input_len, args.reps)
        kv_bytes = (
            b * (args.input_len + 8) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
        )
        out["weight_GB"] = round(weight_bytes / 1e9, 2)
        out["kv_read_GB"] = round(kv_bytes / 1e9, 3)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
