"""Host time of one decode step at N running requests, without a device: the scheduler's
`schedule`, the batch build (`build_step_input`), `Scheduler.update` and output processing.
These run in Python on every engine step; at a large batch they must stay under the device's
step time to stay hidden (see docs/BENCHMARKS.md). With `--engine-process`, as the server's
engine process runs: delta outputs that carry each prompt once, and a `send` column for
pickling them to the server.

    python scripts/bench_host.py --requests 256 1024 [--tokenizer FOLDER] [--kind cumulative]
    python scripts/bench_host.py --requests 200 --input-len 1024 --tokenizer F --engine-process
"""

from __future__ import annotations

import argparse
import itertools
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np

from engine.config import SchedulerConfig, bucket_ladder
from engine.output_processor import OutputProcessor
from engine.outputs import OutputKind
from engine.page_allocator import PageAllocator
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_input import BufferPool, StepLayout, build_step_input, pick_bucket
from engine.types import Request, StepOutput


def time_steps(args: argparse.Namespace, num_requests: int, tokenizer) -> dict[str, float]:
    """Median milliseconds of each host phase over `args.steps` decode steps."""
    page_size, max_len = 16, args.max_model_len
    pages = num_requests * (-(-(args.input_len + args.output_len) // page_size)) + 1
    allocator = PageAllocator(pages, page_size)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=num_requests,
            max_num_batched_tokens=max(16384, num_requests),
            max_model_len=max_len,
        ),
        allocator,
    )
    outputs = OutputProcessor(tokenizer, prompt_once=args.engine_process)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    for i in range(num_requests):
        prompt = rng.integers(3, 1000, args.input_len).tolist()
        outputs.add_request(f"r{i}", None, prompt, params)
        scheduler.add_request(Request(f"r{i}", prompt, params, float(i)))
    pages_per_request = -(-max_len // page_size)
    kind = OutputKind.DELTA if args.engine_process else OutputKind[args.kind.upper()]
    pool = BufferPool()
    token_ladder = bucket_ladder(16, scheduler.config.max_num_batched_tokens)  # the GPU's
    request_ladder = bucket_ladder(8, num_requests)
    phases: dict[str, list[float]] = {"schedule": [], "build": [], "update": [], "outputs": []}
    if args.engine_process:
        phases["send"] = []
    prev = None
    for step in itertools.count():
        if step >= args.steps + 2 or not scheduler.has_unfinished_requests():
            break
        t0 = time.perf_counter()
        sched = scheduler.schedule()
        t1 = time.perf_counter()
        n = len(sched.requests)
        layout = StepLayout(
            pick_bucket(token_ladder, sched.num_batched_tokens),
            pick_bucket(request_ladder, n),
            pages_per_request,
        )
        build_step_input(
            sched,
            layout,
            page_size=page_size,
            rows=list(range(n)),
            seeds=[0] * n,
            scratch_row=n,
            buffers=pool.get(layout),
        )
        t2 = time.perf_counter()
        if prev is not None:
            sampled = rng.integers(3, 1000, len(prev.requests)).tolist()
            updates = scheduler.update(prev, StepOutput(sampled))
            t3 = time.perf_counter()
            outs, _ = outputs.process(updates, kind=kind)
            t4 = time.perf_counter()
            if args.engine_process:  # what engine_core._serve sends
                ForkingPickler.dumps(("outputs", outs, scheduler.stats()))
            t5 = time.perf_counter()
            if step >= 2 and n == num_requests:  # decode steps only (the prompts went first)
                times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
                for name, dt in zip(phases, times, strict=False):
                    phases[name].append(1e3 * dt)
        prev = sched
    return {name: float(np.median(v)) for name, v in phases.items() if v}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=8192, help="sets the page table width")
    p.add_argument("--steps", type=int, default=60, help="decode steps timed")
    p.add_argument("--kind", default="cumulative", choices=[k.name.lower() for k in OutputKind])
    p.add_argument("--tokenizer", default=None, help="detokenize with this tokenizer folder")
    p.add_argument("--engine-process", action="store_true", help="as the server's engine runs")
    args = p.parse_args()
    tokenizer = None
    if args.tokenizer:
        from models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    names = ["schedule", "build", "update", "outputs"] + (["send"] if args.engine_process else [])
    print(f"| requests | {' | '.join(names)} | total (ms, medians) |")
    print("| --- " * (len(names) + 2) + "|")
    for n in args.requests:
        t = time_steps(args, n, tokenizer)
        cells = " | ".join(f"{t[k]:.2f}" for k in names)
        print(f"| {n} | {cells} | {sum(t.values()):.2f} |")


if __name__ == "__main__":
    main()
