"""Time `pallas_kernels.gpu_decode_matmul` against XLA's fusions of the same work, on a GPU, for
the four matmuls of a Llama-3.1-8B decode layer (bf16), device time from a profiler trace:

    python scripts/bench_decode_matmul.py --rows 16 64 --output-json decode_matmul.json [--sweep]

Per matmul and row count (the engine's decode buckets), each entry does one layer's part:
- qkv: rmsnorm(h) @ W_qkv [4096, 6144] (the bare matmul: without the attention's epilogue,
  RoPE and the KV cache write, which the fused layer adds; the forward, `bench_forward.py`,
  times that);
- o_proj: attn @ W_o [4096, 4096] + h;
- gate_up: silu * up of rmsnorm(h) @ W_gate_up [4096, 28672] (interleaved, gate_up.py);
- down: act @ W_down [14336, 4096] + h.
`xla` is `decode_matmul_reference` compiled as the engine compiles that bucket (XLA's split-K
below 64 rows, none at 64-127: engine/executables.py's NO_SPLIT_K), so its kernels are the ones a
step runs. The kernel gets what the fused layer hands it: a norm's inputs as 128 partial sums
(`norm_inputs`, made outside the timing), and the residual adds make the next norm's
inputs. Weights rotate through copies larger than L2 together, so no call finds them in
cache. Reports device us a call, kernels a call and the weights' streaming rate.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
from bench_kernels import L2_BYTES, time_entries  # a sibling script: scripts/ is on sys.path

from engine.executables import NO_SPLIT_K, NO_SPLIT_K_MAX_TOKENS, NO_SPLIT_K_MIN_TOKENS
from pallas_kernels import gpu_decode_matmul as dm
from pallas_kernels.decode_matmul import config_for
from pallas_kernels.gate_up import BLOCK

D, F, QKV = 4096, 14336, 6144
SHAPES = {  # name: (K, N, norm, residual, gate_up)
    "qkv": (D, QKV, True, False, False),
    "o_proj": (D, D, False, True, False),
    "gate_up": (D, 2 * F, True, False, True),
    "down": (F, D, False, True, False),
}


def sweep_configs() -> list[dm.DecodeMatmulConfig]:
    """27 tiles (4 warps); each matmul skips those that do not divide it."""
    return [
        dm.DecodeMatmulConfig(bn, bk, 4, stages)
        for bn in (32, 64, 128)
        for bk in (64, 128, 256)
        for stages in (3, 4, 6)
    ]


def inputs(name: str, rows: int, seed: int = 0) -> list[tuple]:
    k, n, norm, res, _ = SHAPES[name]
    keys = jax.random.split(jax.random.key(seed), 4)
    copies = int(min(16, max(1, -(-3 * L2_BYTES // (k * n * 2)))))
    ws = [
        (jax.random.normal(jax.random.fold_in(keys[0], i), (k, n), jnp.float32) * 0.02).astype(
            jnp.bfloat16
        )
        for i in range(copies)
    ]
    x = jax.random.normal(keys[1], (rows, k), jnp.bfloat16)
    nw = jnp.ones((k,), jnp.bfloat16) if norm else None
    r = jax.random.normal(keys[2], (rows, n), jnp.bfloat16) if res else None
    return [(x, w, nw, r) for w in ws]


def kernel_inputs(name: str, arg_sets: list[tuple]) -> list[tuple]:
    """`inputs` as the fused layer hands them to the kernel: (x or x * norm weight, w, the
    norm's 128 partial sums of squares or None, residual, the next norm's weight or None)."""
    _, n, norm, res, _ = SHAPES[name]
    out = []
    for x, w, nw, r in arg_sets:
        sq = None
        if norm:
            x, sq = dm.norm_inputs(x, nw)
            sq = jnp.tile(sq / 128, (128, 1))
        out.append((x, w, sq, r, jnp.ones((n,), x.dtype) if res else None))
    return out


def entry(fn, arg_sets, options=None):
    """Compiled for the first argument set (all share shapes), with XLA `options`."""
    compiled = jax.jit(fn).lower(*arg_sets[0]).compile(compiler_options=options)
    return compiled, arg_sets


def bench(name: str, rows: int, configs: list | None, args) -> list[dict]:
    k, n, norm, res, gate_up = SHAPES[name]
    arg_sets = inputs(name, rows)
    block = BLOCK if gate_up else None
    ref = functools.partial(_call, dm.decode_matmul_reference, gate_up_block=block)
    options = dict(NO_SPLIT_K) if NO_SPLIT_K_MIN_TOKENS <= rows <= NO_SPLIT_K_MAX_TOKENS else None
    names, entries = ["xla"], [entry(ref, arg_sets, options)]
    if configs is None:  # the engine's tiles (decode_matmul.config_for)
        configs = [config_for(rows, k, n, block)]
    seen = set()
    for cfg in configs:
        if cfg is None or not dm.supports(rows, k, n, cfg, block):
            continue
        if cfg in seen:
            continue
        seen.add(cfg)
        fn = functools.partial(_kernel_call, gate_up_block=block, config=cfg)
        try:
            entries.append(entry(fn, kernel_inputs(name, arg_sets)))
        except Exception as e:  # a config that fails to compile is skipped, loudly
            print(f"  {name} {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        names.append(f"bn{cfg.block_n}/bk{cfg.block_k}/w{cfg.num_warps}/st{cfg.num_stages}")
    timings = time_entries(entries, n=args.inner, reps=args.reps)
    weight_bytes = k * n * 2
    rows_out = []
    for label, t in zip(names, timings, strict=True):
        us = t.device_us or t.wall_us
        rows_out.append(
            dict(
                matmul=name,
                rows=rows,
                config=label,
                device_us=round(us, 2),
                kernels_per_call=t.kernels_per_call,
                weight_tbps=round(weight_bytes / us / 1e6, 3),
            )
        )
    rows_out.sort(key=lambda r: r["device_us"])
    for r in rows_out[: 6 if args.sweep else None]:
        print(
            f"  {name:8s} M={rows:3d} {r['config']:>20s} {r['device_us']:8.2f} us "
            f"k={r['kernels_per_call']} {r['weight_tbps']:.2f} TB/s",
            flush=True,
        )
    return rows_out


def _call(fn, x, w, nw, r, **kw):
    return fn(x, w, norm_weight=nw, residual=r, **kw)


def _kernel_call(x, w, sq, r, next_nw, **kw):
    return dm.decode_matmul(x, w, row_sq=sq, residual=r, next_norm_weight=next_nw, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--matmuls", nargs="+", default=list(SHAPES))
    ap.add_argument(
        "--sweep", action="store_true", help="27 tile configs, else the engine's (config_for)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--output-json", required=True)
    args = ap.parse_args()
    assert jax.devices()[0].platform == "gpu", "needs a GPU"
    configs = sweep_configs() if args.sweep else None
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                  date=time.strftime("%Y-%m-%d"), rows=[])  # fmt: skip
    for rows in args.rows:
        for name in args.matmuls:
            result["rows"] += bench(name, rows, configs, args)
            with open(args.output_json, "w") as f:  # after each point: a killed run keeps the rest
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
