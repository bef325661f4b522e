"""Time the MLP's gate/up step on a Hopper GPU: XLA's matmul plus silu(gate) * up (what the
engine runs without the kernel) against the fused Mosaic GPU kernel (pallas_kernels/gpu_gate_up.py).

    python scripts/bench_mlp.py --rows 128 256 512 1024 8192 --output-json mlp.json

Llama-3-8B's MLP by default (hidden 4,096, intermediate 14,336), bf16, the interleaved weight
layout of pallas_kernels/gate_up.py. Device time from CUPTI
(`jax.experimental.mosaic.gpu.profiler`): all kernels of one call, median over `--iters`
calls. Each kernel config's max abs difference from XLA's result is recorded (bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pallas_kernels import gate_up, gpu_gate_up


def device_us(fn, *args, iters: int) -> tuple[jax.Array, float]:
    from jax.experimental.mosaic.gpu import profiler

    out, times_ms = profiler.measure(jax.jit(fn), iterations=iters)(*args)
    return out, statistics.median(times_ms) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 8192])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--output-json", required=True)
    args = ap.parse_args()
    block, k, f = gate_up.BLOCK, args.hidden, args.intermediate
    base = gpu_gate_up.default_config(k)  # the engine's tiles, and variants of them
    configs = {
        f"tile_m{tm}_width{gw}": dataclasses.replace(base, tile_m=tm, grid_tile_width=gw)
        for tm in (128, 64)
        for gw in (8, 16)
    }
    w = jax.random.normal(jax.random.key(1), (k, 2 * f), jnp.float32) * k**-0.5
    w = gate_up.interleave(w.astype(jnp.bfloat16), block)
    xla = lambda x, w: gate_up.silu_gate_up_reference(x @ w, block)
    results = []
    for m in tqdm(args.rows, desc="rows"):
        x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(jnp.bfloat16)
        want, xla_us = device_us(xla, x, w, iters=args.iters)
        _, matmul_us = device_us(lambda x, w: x @ w, x, w, iters=args.iters)
        row = {"rows": m, "xla_us": xla_us, "xla_matmul_only_us": matmul_us, "fused": {}}
        for name, cfg in configs.items():
            if not gpu_gate_up.supports(m, k, 2 * f, x.dtype, w.dtype, cfg):
                continue
            fn = functools.partial(gpu_gate_up.silu_gate_up, config=cfg)
            got, us = device_us(fn, x, w, iters=args.iters)
            err = np.max(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)))
            row["fused"][name] = {"us": us, "max_abs_err": float(err)}
        tqdm.write(json.dumps(row))
        results.append(row)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    with open(args.output_json, "w") as fh:
        json.dump({**meta, "hidden": k, "intermediate": f, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
