"""Profile decode steps with the JAX profiler and summarise the trace without TensorBoard:
device time per step by kernel, device idle gaps, and host time per step.

    python scripts/trace_step.py --model scripts/configs/llama-3.1-8b --batch 64 --out /tmp/t

With `--prefill-len P`, every traced step also carries P tokens of a long prompt (a mixed step
of batch + P tokens, as serving under load runs); with `--batch 0` as well, each step is
`--prompts-per-step` fresh prompts of P tokens (pure prefill, as offline 1024/128 runs it).
With `--fresh-prompts`, the batch's decodes ride beside those fresh prompts instead (a served
prompt step: its chunk attends to itself alone, where the long prompt's later chunks attend to
every earlier one).
Steps run in the engine's bucket for their size (a power of two, padded): pick P so that
batch + P is one to trace no padding.

Writes the Perfetto trace (`*.trace.json.gz`) under --out and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

import jax
import numpy as np


def fill_decoding(llm, batch: int, input_len: int, temperature: float) -> None:
    """Add `batch` random prompts of `input_len` tokens (ignore_eos) and step the engine until
    all of them decode, and 5 steps more (also used by scripts/bench_forward.py)."""
    from tqdm import tqdm

    from engine import SamplingParams

    eng = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=temperature, max_tokens=100_000, ignore_eos=True)
    vocab = eng.model_config.vocab_size
    for i in range(batch):
        prompt = rng.integers(0, min(20000, vocab), input_len).tolist()
        eng.add_request(f"t{i}", {"prompt_token_ids": prompt}, params)
    requests = eng.scheduler.requests
    with tqdm(desc="prefilling", total=batch * input_len, leave=False) as bar:
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in requests.values()):
            eng.step()
            bar.n = sum(r.num_computed_tokens for r in requests.values())
            bar.refresh()
    for _ in range(5):  # past the steps that still carry prompt tokens (async scheduling)
        eng.step()


def engine_bucket(n: int, smallest: int = 16) -> int:
    """The rung of the engine's GPU ladders (powers of two from 16 tokens, from 8 requests)
    that `n` tokens or requests run in: traced steps run padded, as the engine's do. A bucket
    of its own (12 decodes + 1,024 prompt tokens = 1,036) made XLA pad every matmul's operands
    for cuBLAS, ~1.9 ms of pad fusions a step that the engine never runs (H100, fourteenth
    session). Past the default budget of 8,192 tokens the rung is still a power of two, which
    only an engine with a larger `max_num_batched_tokens` would run."""
    return max(smallest, 1 << (n - 1).bit_length())


def newest_trace(folder: str) -> str | None:
    """The Perfetto trace the last profiler session wrote under `folder`: a folder used before
    holds older traces too, and glob's order is arbitrary (a rerun once summarised a stale one)."""
    files = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
    return max(files, key=os.path.getmtime) if files else None


def kernel_kind(name: str) -> str:
    """A device kernel's kind, from the names cuBLAS, cuDNN, XLA and our kernels use."""
    low = name.lower()
    if "gate_up" in low:  # the fused gate/up matmul, a Mosaic GPU kernel too (gpu_gate_up.py)
        return "matmul"
    if any(w in low for w in ("attention", "prefill", "flash", "sdpa", "mosaic")):
        return "attention"
    if any(w in low for w in ("gemm", "xmma", "nvjet", "cutlass", "sm90_", "matmul", "dot")):
        return "matmul"
    if "scatter" in low:
        return "kv_write"
    if "memcpy" in low or "memset" in low:
        return "copy"
    return "other"


def summarize(
    trace_file: str, num_steps: int, num_layers: int | None = None, top: int = 15
) -> dict:
    """Per-step figures over the steps the device ran inside the trace. With async scheduling
    that is not the number of `step()` calls: the step in flight when the trace starts, and
    the one dispatched last, run inside it too. Given `num_layers`, the steps are counted on
    the device (attention launches / layers); else `num_steps` is taken as is."""
    with gzip.open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e["args"]["name"]
    gpu_pids = {p for p, n in names.items() if "gpu" in n.lower() or "/device:" in n.lower()}
    # Split over several GPUs, each device is a process of its own: keep the lowest-numbered
    # one, so that the figures are one card's step (the others run the same kernels on their
    # shards).
    index = {p: int(m.group(1)) for p in gpu_pids if (m := re.search(r"GPU:(\d+)", names[p]))}
    devices = len(set(index.values()))
    if devices > 1:
        first = min(index.values())
        gpu_pids = {p for p, i in index.items() if i == first}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]
    by_name = collections.Counter()
    by_kind = collections.Counter()
    for e in kernels:
        by_name[e["name"][:60]] += e["dur"]
        by_kind[kernel_kind(e["name"])] += e["dur"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end, gaps = 0.0, None, []
    for start, stop in spans:
        if end is None or start > end:
            if end is not None:
                gaps.append(start - end)
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    wall = (spans[-1][1] - spans[0][0]) if spans else 0.0
    num_calls = num_steps
    # One attention launch a layer: the Triton kernel's, or the Mosaic GPU kernel's.
    launches = sum(1 for e in kernels if kernel_kind(e["name"]) == "attention")
    if num_layers and launches:
        num_steps = launches / num_layers
    host = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu_pids:
            host[e["name"][:60]] += e["dur"]
    return {
        "steps": num_steps,
        "step_calls_in_trace": num_calls,
        "device_busy_ms_per_step": round(busy / num_steps / 1e3, 3),
        "device_span_ms_per_step": round(wall / num_steps / 1e3, 3),
        "num_kernels_per_step": round(len(kernels) / num_steps, 1),
        "gaps_over_50us_per_step": round(sum(g for g in gaps if g > 50) / num_steps / 1e3, 3),
        "kernel_kinds_ms_per_step": {
            k: round(v / num_steps / 1e3, 3) for k, v in by_kind.most_common()
        },
        "top_kernels_ms_per_step": {
            k: round(v / num_steps / 1e3, 3) for k, v in by_name.most_common(top)
        },
        "top_host_events_ms_per_step": {
            k: round(v / num_steps / 1e3, 3) for k, v in host.most_common(40)
        },
        "sync_like_host_events_per_step": {
            k: round(v / num_steps / 1e3, 3)
            for k, v in host.items()
            if any(
                w in k
                for w in ("Conditional", "While", "Block", "Memcpy", "Synchron", "Wait", "Case")
            )
        },
        "devices_in_trace": devices,
        "processes": sorted(names.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prefill-len", type=int, default=0)
    ap.add_argument(
        "--prompts-per-step",
        type=int,
        default=1,
        help="fresh prompts a step (with --batch 0 or --fresh-prompts)",
    )
    ap.add_argument(
        "--fresh-prompts",
        action="store_true",
        help="with --batch B and --prefill-len P: each step's P tokens are fresh prompts",
    )
    ap.add_argument("--top", type=int, default=15, help="kernels listed by name")
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="of the decoding requests (0 = greedy)"
    )
    ap.add_argument(
        "--max-num-seqs", type=int, default=0, help="the engine's seats (the server's: 256)"
    )
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model over N GPUs, with the pool and all-reduces `pagejax -tp N` sets",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from engine import LLM, SamplingParams
    from engine.outputs import OutputKind

    b, p = args.batch, args.prefill_len
    if args.fresh_prompts and not p:
        ap.error("--fresh-prompts needs --prefill-len")
    if args.tensor_parallel_size > 1:  # what `pagejax -tp N` sets: its pool and all-reduces
        from api.cli import set_jax_env

        set_jax_env(args.tensor_parallel_size)
    fresh = bool(p) and (not b or args.fresh_prompts)
    n = args.prompts_per_step if fresh else 1
    step_tokens = engine_bucket(b if not p else b + p * n)
    # Fresh prompts: the step in flight still holds its n requests when the next is scheduled
    # (async scheduling), so n new ones need 2n seats beside the b decodes, or only every
    # other call admits any.
    seats = max(8, b + 1, b + 2 * n if fresh else 0, args.max_num_seqs)
    step_requests = b + n if fresh else max(b, n)
    llm = LLM(
        args.model,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_num_seqs=seats,
        enable_prefix_caching=False,
        max_num_batched_tokens=max(2048, step_tokens),
        max_model_len=max(args.input_len + 512, p * (args.steps + 4)),
        token_buckets=tuple(sorted({engine_bucket(b), step_tokens, 2048})),
        request_buckets=tuple(sorted({engine_bucket(step_requests, 8), engine_bucket(seats, 8)})),
        long_prefill_token_threshold=p,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    fill_decoding(llm, b, args.input_len, args.temperature)
    rng = np.random.default_rng(1)
    vocab = min(20000, llm.engine.model_config.vocab_size)
    prefill = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def add_prompt(name: str, length: int) -> None:
        prompt = rng.integers(0, vocab, length).tolist()
        llm.engine.add_request(name, {"prompt_token_ids": prompt}, prefill)

    long_prompt = bool(p and b) and not fresh
    if long_prompt:  # one long prompt: with the threshold at p, every step takes p of its tokens
        add_prompt("long", p * (args.steps + 3))
        llm.engine.step(kind=OutputKind.FINAL_ONLY)

    def long_computed() -> int:
        long = llm.engine.scheduler.requests.get("long")
        return long.num_computed_tokens if long is not None else 0

    for i in range(2 if fresh else 0):  # warm: the first steps of a bucket run slower
        for j in range(n):
            add_prompt(f"warm{i}_{j}", p)
        llm.engine.step(kind=OutputKind.FINAL_ONLY)
    if long_prompt and "long" not in {r.request_id for r in llm.engine.scheduler.running}:
        # Admission reserves pages for a request's whole prompt: p * (steps + 3) tokens beside
        # the batch's may not fit the KV cache (likely why an 8B run on an H100 at 248 x 1,100
        # beside 7,936 x 7 traced decode-only steps).
        print(
            "trace_step: the long prompt was not admitted, so the traced steps are decode-only; "
            "use fewer --steps or a smaller --batch",
            file=sys.stderr,
        )
    jax.effects_barrier()
    long_before = long_computed()
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        t = time.perf_counter()
        for i in range(args.steps):
            if fresh:
                for j in range(n):
                    add_prompt(f"fresh{i}_{j}", p)
            llm.engine.step(kind=OutputKind.FINAL_ONLY)
        host_ms = (time.perf_counter() - t) * 1e3 / args.steps
    trace = newest_trace(args.out)
    num_layers = llm.engine.model_config.num_layers
    out = (
        summarize(trace, args.steps, num_layers, args.top)
        if trace
        else {"error": "no perfetto trace"}
    )
    out.update(
        batch=b,
        prefill_len=p,
        prompts_per_step=n,
        # Fresh prompts left unscheduled: 0 when every step took its n prompts.
        waiting_after=llm.engine.scheduler.stats().num_waiting,
        # With --batch and --prefill-len: the long prompt's tokens each traced step took (p
        # when the steps were the mixed steps asked for; 0 if it was never admitted).
        long_prompt_tokens_per_step=(long_computed() - long_before) / args.steps
        if long_prompt
        else None,
        temperature=args.temperature,
        engine_step_ms_under_trace=round(host_ms, 3),
    )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
