"""Time the MLP's gate/up step on a Hopper GPU: XLA's matmul plus silu(gate) * up (what the
engine runs without the kernel) against the fused Mosaic GPU kernel (pallas_kernels/gpu_gate_up.py).

    python scripts/bench_mlp.py --rows 128 256 512 1024 8192 --output-json mlp.json

Llama-3-8B's MLP by default (hidden 4,096, intermediate 14,336), bf16, the interleaved weight
layout of pallas_kernels/gate_up.py. Device time from CUPTI
(`jax.experimental.mosaic.gpu.profiler`): all kernels of one call, median over `--iters`
calls. Each kernel config's max abs difference from XLA's result is recorded (bf16).

`--sustained SECONDS` times each config under sustained load instead, as a long prefill run
holds the card: at its power cap, with the SM clock well below its maximum (an H200 at 700 W
held ~1,500 of 1,980 MHz; docs/BENCHMARKS.md, twentieth session). Bursts of 50 calls do not
reach the cap and rank configs by their clock-boosted speed. Each config runs back to back for
SECONDS, then is timed by the wall clock over ~1 s of calls; the configs take turns over
`--rounds` rounds, so drift (heat) spreads over all of them. One executable chains `_CHAIN`
calls on distinct inputs (identical calls would be merged), and only a scalar of each result
is kept, so no output piles up in memory (`profiler.measure` keeps every call's output: 1,000
calls at 8,192 rows ran out of memory).

    python scripts/bench_mlp.py --rows 2048 8192 --sustained 3 --output-json mlp_sustained.json

`--data` picks the operands' values, since under the power cap the bits decide the clock
(zeros draw less power): `normal` (x ~ N(0, 1), W ~ N(0, 1 / K)), `vllm` (what vLLM's
`--load-format dummy` makes: every weight U(-1e-3, 1e-3), norm scales too, so x is a
normalised row times such a scale), or `zeros` (zero x, normal W). On an H100 at 8,192 rows,
sustained: `vllm` within 0.5 % of `normal`, `zeros` 13-18 % faster (docs/BENCHMARKS.md,
twenty-second session).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pallas_kernels import gate_up, gpu_gate_up

DATA = ("normal", "vllm", "zeros")


def _check(data: str) -> None:
    if data not in DATA:
        raise ValueError(f"--data must be one of {DATA}, got {data!r}")


def activations(data: str, shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    """x of `shape` [..., K] in bfloat16, with `data`'s values (the module's docstring)."""
    _check(data)
    kx, ks = jax.random.split(jax.random.key(seed))
    if data == "zeros":
        return jnp.zeros(shape, jnp.bfloat16)
    x = jax.random.normal(kx, shape, jnp.float32)
    if data == "vllm":  # a normalised row times the norm's U(-1e-3, 1e-3) scale
        x = x * jax.random.uniform(ks, shape[-1:], jnp.float32, -1e-3, 1e-3)
    return x.astype(jnp.bfloat16)


def weights(data: str, k: int, two_f: int, seed: int = 1) -> jax.Array:
    """w [K, 2F] in bfloat16: U(-1e-3, 1e-3) for `vllm`, else N(0, 1 / K)."""
    _check(data)
    key = jax.random.key(seed)
    if data == "vllm":
        return jax.random.uniform(key, (k, two_f), jnp.float32, -1e-3, 1e-3).astype(jnp.bfloat16)
    return (jax.random.normal(key, (k, two_f), jnp.float32) * k**-0.5).astype(jnp.bfloat16)


def device_us(fn, *args, iters: int) -> tuple[jax.Array, float]:
    from jax.experimental.mosaic.gpu import profiler

    out, times_ms = profiler.measure(jax.jit(fn), iterations=iters)(*args)
    return out, statistics.median(times_ms) * 1e3


_CHAIN = 16  # calls one sustained-load executable runs back to back


def chained(fn, reps: int):
    """jit(xs [reps, M, K], w) -> the sum of result[0, 0] of `fn(xs[i], w)` over i: `reps`
    calls in one executable, each on its own input, with only a scalar kept of each."""

    def run(xs, w):
        return sum(fn(xs[i], w)[0, 0].astype(jnp.float32) for i in range(reps))

    return jax.jit(run)


def sustained_us(fns: dict, xs: jax.Array, w: jax.Array, seconds: float, rounds: int) -> dict:
    """Per-call microseconds of each of `fns` under sustained load: each, in turn, `rounds`
    times, runs back to back for `seconds`, then ~1 s is timed by the wall clock. Returns
    {name: [us of each round]}."""
    calls = {}
    for name, fn in fns.items():
        call = chained(fn, xs.shape[0])
        try:
            call(xs, w).block_until_ready()  # compile
        except Exception as e:  # a config that does not lower is skipped, loudly
            tqdm.write(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        calls[name] = call
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                call(xs, w).block_until_ready()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0:
                for _ in range(4):  # four in flight: no gap between executables
                    last = call(xs, w)
                last.block_until_ready()
                n += 4
            out[name].append((time.perf_counter() - t0) / (n * xs.shape[0]) * 1e6)
    return out


def fused_fns(m: int, w: jax.Array, configs: dict, dtype) -> dict:
    """The kernel on each config that takes x [m, K] @ w."""
    (k, two_f) = w.shape
    return {
        name: functools.partial(gpu_gate_up.silu_gate_up, config=cfg)
        for name, cfg in configs.items()
        if gpu_gate_up.supports(m, k, two_f, dtype, w.dtype, cfg)
    }


def burst_row(args, m: int, w: jax.Array, xla, configs: dict) -> dict:
    """CUPTI medians over `--iters` calls: XLA's pair, its matmul alone, each config (with its
    max abs difference from XLA's result)."""
    x = activations(args.data, (m, w.shape[0]))
    want, xla_us = device_us(xla, x, w, iters=args.iters)
    _, matmul_us = device_us(lambda x, w: x @ w, x, w, iters=args.iters)
    row = {"rows": m, "xla_us": xla_us, "xla_matmul_only_us": matmul_us, "fused": {}}
    for name, fn in fused_fns(m, w, configs, x.dtype).items():
        got, us = device_us(fn, x, w, iters=args.iters)
        err = np.max(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)))
        row["fused"][name] = {"us": us, "max_abs_err": float(err)}
    return row


def sustained_row(args, m: int, w: jax.Array, xla, configs: dict) -> dict:
    """`sustained_us` of XLA's pair and each config, and each one's best TFLOP/s."""
    xs = activations(args.data, (_CHAIN, m, w.shape[0]))
    fns = {"xla": xla, **fused_fns(m, w, configs, xs.dtype)}
    us = sustained_us(fns, xs, w, args.sustained, args.rounds)
    flop = 2 * m * w.shape[0] * w.shape[1]
    return {
        "rows": m,
        "sustained_us": us,
        "tflops": {n: flop / min(v) / 1e6 for n, v in us.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 8192])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--sustained", type=float, default=0.0, help="seconds of load per config")
    ap.add_argument("--rounds", type=int, default=2, help="turns of each config (--sustained)")
    ap.add_argument("--only", nargs="+", help="the sustained configs to run, by name (default all)")
    ap.add_argument("--data", choices=DATA, default="normal", help="the operands' values")
    ap.add_argument("--output-json", required=True)
    args = ap.parse_args()
    block, k, f = gate_up.BLOCK, args.hidden, args.intermediate
    base = gpu_gate_up.default_config(k)  # the engine's tiles, and variants of them
    if args.sustained:
        configs = {  # K slabs in a ring that fits shared memory, by snake width
            f"k{tk}_ring{ring}_width{gw}": dataclasses.replace(
                base, tile_k=tk, max_concurrent_steps=ring, grid_tile_width=gw
            )
            for tk, ring in ((128, 2), (64, 3), (64, 4), (32, 6))
            for gw in (8, 16, 32)
        }
        configs = {n: c for n, c in configs.items() if not args.only or n in args.only}
    else:
        configs = {
            f"tile_m{tm}_width{gw}": dataclasses.replace(base, tile_m=tm, grid_tile_width=gw)
            for tm in (128, 64)
            for gw in (8, 16)
        }
    w = gate_up.interleave(weights(args.data, k, 2 * f), block)
    xla = lambda x, w: gate_up.silu_gate_up_reference(x @ w, block)
    row_for = sustained_row if args.sustained else burst_row
    results = []
    for m in tqdm(args.rows, desc="rows"):
        row = row_for(args, m, w, xla, configs)
        tqdm.write(json.dumps(row))
        results.append(row)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "data": args.data}
    with open(args.output_json, "w") as fh:
        json.dump({**meta, "hidden": k, "intermediate": f, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
