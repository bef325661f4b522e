"""Time the paged attention kernels on a GPU against the HBM roofline.

    python scripts/bench_kernels.py --output-json bench_kernels.json [--sweep] [--quick]

Decode: batch 1..256 x context 512..8192, 32 q / 8 kv heads, head_dim 128, bf16. Reports the
KV bandwidth achieved (bytes of K and V the batch must read / time) and its share of the card's
measured HBM bandwidth (`PEAK_TBPS`: roofline.py's copy, read + write; `--peak-tbps` overrides;
the 1 GiB XLA copy this script times at start is printed too, but reads low). Also:
mixed batches, dense causal prefill through cuDNN (`jax.nn.dot_product_attention`) beside our
kernel on the same prefill, and the deprecated `jax.experimental.pallas.ops.gpu.paged_attention`
as a decode baseline where it imports. On prefill and mixed batches, `mgpu` is the Mosaic GPU
kernel (gpu_mosaic_attention.py, Hopper); the default row (`default`) is the Triton kernel.

Timing: device time from a profiler trace (CUPTI kernel records): `device_us` sums every kernel
of one call (the block-table metadata, the attention kernel, the split-K merge), `kernel_us` is
the attention kernel alone. `wall_us` is the old host-clock figure (`--inner` calls back to back,
one block, median of `--reps`), which at small batches measures host dispatch, not the GPU.
Small batches rotate over several page tables into a pool larger than L2, so no timed call
finds its KV in cache. `--sweep` compiles ~20 tile configs per point (in threads) and prints a
table per point, fastest first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import glob
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pallas_kernels import gpu_mosaic_attention as mgpu
from pallas_kernels import gpu_ragged_paged_attention as gpu

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, jnp.bfloat16
GROUP = NUM_HEADS // NUM_KV_HEADS
L2_BYTES = 50 << 20  # H100 / H200: rotate inputs through a few times this
GAP_NS = 2_000_000  # idle time that separates two timed entries in a trace
# Measured HBM bandwidth (read + write) of a large device copy: H200 by roofline.py (jax 0.11.2);
# H100 by the device notes (KINDS.md). Decode reads stream at up to ~1.02x these.
PEAK_TBPS = {"H200": 4.214, "H100": 3.0}


@dataclasses.dataclass
class Timing:
    wall_us: float
    device_us: float | None = None  # all kernels of one call
    kernel_us: float | None = None  # the longest-running kernel name of the call
    kernels_per_call: float | None = None
    per_kernel_us: dict | None = None  # name -> us a call, for calls of several launches


def _gpu_segments(run) -> list[list[tuple[str, int]]] | None:
    """Run `run()` under the profiler; GPU kernel (name, ns) records, split at idle gaps."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return None
        data = ProfileData.from_file(paths[0])
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = [line for line in plane.lines if "Stream" in line.name] or list(plane.lines)
        for line in lines:
            events += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
    events.sort()
    segments: list[list[tuple[str, int]]] = []
    last_end = None
    for start, dur, name in events:
        if last_end is None or start - last_end > GAP_NS:
            segments.append([])
        segments[-1].append((name, dur))
        last_end = max(last_end or 0, start + dur)
    return segments


def time_entries(entries: list, *, n: int, reps: int) -> list[Timing]:
    """entries: [(fn, [args, ...])]; call i of an entry takes args[i % len]. One Timing each."""
    for fn, arg_sets in entries:  # compile + warm up, outside the trace
        for a in arg_sets:
            jax.block_until_ready(fn(*a))

    def calls(fn, arg_sets):
        start = time.perf_counter()
        out = None
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / n

    timings = [
        Timing(wall_us=1e6 * statistics.median(calls(fn, a) for _ in range(reps)))
        for fn, a in entries
    ]

    def traced():
        for fn, arg_sets in entries:
            time.sleep(0.01)
            calls(fn, arg_sets)

    segments = _gpu_segments(traced)
    if segments is None or len(segments) != len(entries):
        got = None if segments is None else len(segments)
        tqdm.write(f"  profiler: {got} GPU segments for {len(entries)} entries; wall time only")
        return timings
    for t, seg in zip(timings, segments, strict=True):
        per_name: dict[str, int] = defaultdict(int)
        for name, dur in seg:
            per_name[name] += dur
        t.device_us = sum(per_name.values()) / n / 1e3
        t.kernel_us = max(per_name.values()) / n / 1e3
        t.kernels_per_call = len(seg) / n
        t.per_kernel_us = {k: v / n / 1e3 for k, v in sorted(per_name.items(), key=lambda x: -x[1])}
    return timings


def measure_copy_tbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written) of a 1 GiB bf16 array."""
    x = jax.random.normal(jax.random.key(0), (1 << 29,), jnp.bfloat16)
    (t,) = time_entries([(jax.jit(lambda a: a * 2), [(x,)])], n=10, reps=3)
    sec = (t.kernel_us or t.wall_us) / 1e6
    return 2 * x.nbytes / sec / 1e12


def make_inputs(
    q_lens: list[int],
    kv_lens: list[int],
    page_size: int,
    seed: int = 0,
    *,
    buckets: tuple[int, int] | None = None,
):
    """A random ragged batch: (args, [args with another page table, ...]).

    args = (q, kv_cache, kv_lens, page_table, query_start, num_seqs). Each rotation's page table
    takes a disjoint random set of pages, enough rotations for ~3x L2 of KV between repeats.
    `buckets` (T, R): padded as the engine pads a step, to T tokens and R requests (the
    padding requests have no tokens and no keys; `num_seqs` counts the real ones), so that
    the kernel's default tiles are the ones the engine's bucket runs.
    """
    rng = np.random.default_rng(seed)
    num_real = len(q_lens)
    if buckets is not None:
        num_tokens, num_requests = buckets
        assert num_tokens >= sum(q_lens) and num_requests >= num_real, (buckets, num_real)
        q_lens = [*q_lens, *[0] * (num_requests - num_real)]
        kv_lens = [*kv_lens, *[0] * (num_requests - num_real)]
    num_req = len(q_lens)
    pages_per_req = max(-(-kv // page_size) for kv in kv_lens)
    kv_bytes = kv_bytes_of(kv_lens)
    rotations = int(min(16, max(1, -(-3 * L2_BYTES // kv_bytes))))
    per_rot = num_req * pages_per_req
    num_pages = rotations * per_rot + 1
    perm = (rng.permutation(num_pages - 1) + 1).astype(np.int32)
    tables = [
        jnp.asarray(perm[r * per_rot : (r + 1) * per_rot].reshape(num_req, pages_per_req))
        for r in range(rotations)
    ]
    key = jax.random.key(seed)
    num_tokens = sum(q_lens) if buckets is None else buckets[0]
    q = jax.random.normal(key, (num_tokens, NUM_HEADS, HEAD_DIM), DTYPE)
    kv_cache = jax.random.normal(key, (2, NUM_KV_HEADS, num_pages, page_size, HEAD_DIM), DTYPE)
    query_start = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    lens = jnp.asarray(kv_lens, jnp.int32)
    num_seqs = jnp.asarray([num_real], jnp.int32)
    return [(q, kv_cache, lens, pt, query_start, num_seqs) for pt in tables]


def engine_decode_buckets(
    batch: int, max_num_seqs: int = 256, budget: int = 8192
) -> tuple[int, int]:
    """The (T, R) bucket that a decode step of `batch` requests runs in with the engine's
    default GPU ladders (`engine.buckets`): below 128 tokens the token bucket's one request
    rung, so 1-16 decodes run at (16, 16)."""
    from engine.buckets import Buckets
    from engine.config import EngineConfig, SchedulerConfig
    from engine.step_input import pick_bucket

    limits = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    ladders = Buckets(
        EngineConfig(scheduler=limits), platform="gpu", pages_per_request=1, kernel_twins=False
    )
    t = pick_bucket(ladders.token_buckets, batch)
    return t, pick_bucket(ladders.request_buckets_for(t), batch)


def kv_bytes_of(kv_lens: list[int]) -> int:
    return sum(kv_lens) * NUM_KV_HEADS * HEAD_DIM * 2 * jnp.dtype(DTYPE).itemsize


def compile_ours(configs: list, args: tuple) -> list:
    """Compile our kernel for each config (None = default) in threads; None where it failed."""
    lowered = []
    for cfg in configs:
        fn = functools.partial(gpu.ragged_paged_attention, sm_scale=HEAD_DIM**-0.5, config=cfg)
        try:
            lowered.append(jax.jit(fn).lower(*args))
        except Exception as e:  # a sweep point that fails to lower is skipped, loudly
            tqdm.write(f"  config {cfg} failed to lower: {type(e).__name__}: {str(e)[:300]}")
            lowered.append(None)

    def comp(item):
        cfg, low = item
        if low is None:
            return None
        try:
            return low.compile()
        except Exception as e:
            tqdm.write(f"  config {cfg} failed to compile: {type(e).__name__}: {str(e)[:300]}")
            return None

    with concurrent.futures.ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 2)) as pool:
        return list(pool.map(comp, zip(configs, lowered, strict=True)))


def old_paged_attention(arg_sets: list):
    """Deprecated jax.experimental.pallas.ops.gpu.paged_attention on the same decode batch."""
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as old
    except ImportError:
        return None
    pages = arg_sets[0][3].shape[1]
    k_splits = next(s for s in (16, 8, 4, 2, 1) if pages % s == 0)
    fn = jax.jit(functools.partial(old.paged_attention, k_splits=k_splits))
    sets = [(q, kv[0], kv[1], pt, lens) for q, kv, lens, pt, _, _ in arg_sets]
    try:
        jax.block_until_ready(fn(*sets[0]))
    except Exception as e:
        tqdm.write(f"  baseline failed: {type(e).__name__}: {str(e)[:200]}")
        return None
    return fn, sets


def cfg_str(cfg) -> str:
    if cfg is None:
        return "default"
    return f"q{cfg.block_q}/kv{cfg.block_kv}/s{cfg.num_splits}/w{cfg.num_warps}/st{cfg.num_stages}"


def parse_config(text: str) -> gpu.GpuBlockConfig:
    """`q4/kv128/s1/w4/st3` (the form `cfg_str` prints) -> GpuBlockConfig."""
    fields = dict(q="block_q", kv="block_kv", s="num_splits", w="num_warps", st="num_stages")
    values = {}
    for part in text.split("/"):
        key = part.rstrip("0123456789")
        values[fields[key]] = int(part[len(key) :])
    return gpu.GpuBlockConfig(**values)


def decode_sweep_configs(batch: int) -> list:
    bq = max(1, 16 // GROUP)
    if batch <= 4:
        combos = [(64, 4, 2), (64, 4, 3), (128, 4, 1), (128, 4, 2), (128, 4, 3)]
        splits = (8, 16, 32)
    elif batch >= 512:  # short contexts (the KV capacity bounds the mean): smaller tiles too
        combos = [(32, 4, 2), (32, 4, 3), (64, 2, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4)]
        combos += [(128, 2, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3)]
        splits = (1,)
    else:
        combos = [(32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3)]
        combos += [(128, 4, 1), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3), (128, 8, 4)]
        combos += [(256, 4, 2), (256, 8, 2)]
        splits = (1, 2, 4, 8) if batch <= 16 else (1, 2, 4) if batch <= 32 else (1, 2)
    return [gpu.GpuBlockConfig(bq, kv, s, w, st) for kv, w, st in combos for s in splits]


def prefill_sweep_configs() -> list:
    out = []
    for rows in (64, 128):
        for kv in (32, 64, 128):
            for w, st in ((4, 2), (4, 3), (8, 2), (8, 3)):
                out.append(gpu.GpuBlockConfig(rows // GROUP, kv, 1, w, st))
    return out


def mixed_sweep_configs() -> list:
    out = []
    for bq in (16, 32):
        for kv in (64, 128):
            for w, st in ((4, 2), (4, 3), (8, 3)):
                out.append(gpu.GpuBlockConfig(bq, kv, 1, w, st))
    return out


def mgpu_entries(arg_sets) -> dict:
    """The Mosaic GPU kernel (gpu_mosaic_attention.py), where it runs."""
    fn = jax.jit(functools.partial(mgpu.ragged_paged_attention, sm_scale=HEAD_DIM**-0.5))
    try:
        jax.block_until_ready(fn(*arg_sets[0]))
    except Exception as e:
        tqdm.write(f"  mgpu failed: {type(e).__name__}: {str(e)[:300]}")
        return {}
    return {"mgpu": (fn, arg_sets)}


def bench_point(args, label: str, arg_sets, kv_lens, configs: list, extra: dict) -> list[dict]:
    """Time our kernel for each config (and `extra`: name -> (fn, arg_sets)) on one batch."""
    compiled = compile_ours(configs, arg_sets[0])
    names, entries = [], []
    for cfg, exe in zip(configs, compiled, strict=True):
        if exe is not None:
            names.append(cfg_str(cfg))
            entries.append((exe, arg_sets))
    for name, entry in extra.items():
        if entry is not None:
            names.append(name)
            entries.append(entry)
    timings = time_entries(entries, n=args.inner, reps=args.reps)
    nbytes = kv_bytes_of(kv_lens)
    rows = []
    for name, t in zip(names, timings, strict=True):
        row = dict(point=label, config=name, **dataclasses.asdict(t))
        best = t.device_us or t.wall_us
        row["kv_tbps"] = nbytes / best / 1e6
        row["pct_peak"] = 100 * row["kv_tbps"] / args.peak_tbps
        rows.append(row)
    return rows


def print_rows(rows: list[dict], extra_cols=()) -> None:
    key = lambda r: r["device_us"] if r["device_us"] is not None else r["wall_us"]
    for r in sorted(rows, key=key):
        dev = "-" if r["device_us"] is None else f"{r['device_us']:8.1f}"
        ker = "-" if r["kernel_us"] is None else f"{r['kernel_us']:8.1f}"
        kpc = "-" if r["kernels_per_call"] is None else f"{r['kernels_per_call']:.0f}"
        more = " ".join(f"{c}={r[c]:.0f}" for c in extra_cols if r.get(c) is not None)
        if r.get("per_kernel_us"):  # the two biggest kernels of the call
            more += (
                " ["
                + ", ".join(f"{k[:32]} {v:.1f}" for k, v in list(r["per_kernel_us"].items())[:2])
                + "]"
            )
        tqdm.write(
            f"  {r['point']:>22s} {r['config']:>26s} dev {dev} us  kern {ker} us  "
            f"wall {r['wall_us']:8.1f} us  n_k {kpc}  {r['kv_tbps']:.2f} TB/s "
            f"({r['pct_peak']:.0f}%) {more}"
        )


def bench_decode(args) -> list[dict]:
    rows = []
    for batch in args.batches:
        for ctx in args.contexts:
            label = f"decode B={batch} ctx={ctx}"
            configs = [None] + (decode_sweep_configs(batch) if args.sweep else args.configs)
            buckets = None
            if args.engine_buckets:
                buckets = engine_decode_buckets(batch)
                label += f" (bucket T={buckets[0]} R={buckets[1]})"
            arg_sets = make_inputs([1] * batch, [ctx] * batch, args.page_size, buckets=buckets)
            # The deprecated kernel reads every row of its batch: only on unpadded ones.
            extra = {} if buckets else {"jax_paged_attention": old_paged_attention(arg_sets)}
            point = bench_point(args, label, arg_sets, [ctx] * batch, configs, extra)
            print_rows(point)
            rows += point
    return rows


def bench_mixed(args) -> list[dict]:
    """Decodes beside prefill chunks: what a continuous-batching step looks like."""
    cases = {
        "31 dec@2048+512@1024": ([1] * 31 + [512], [2048] * 31 + [1024]),
        "63 dec@4096+2x256@2048": ([1] * 63 + [256] * 2, [4096] * 63 + [2048] * 2),
        "1 prefill 4096": ([4096], [4096]),
        # The steady state of 1000 x 1024-in / 128-out at 256 requests: 248 decodes at ~1,100
        # tokens of context beside 8 fresh prompts (an 8,192-token step).
        "248 dec@1100+8x968": ([1] * 248 + [968] * 8, [1100] * 248 + [968] * 8),
        # 1000 x 128-in / 128-out at 1,024 requests: ~960 decodes at ~200 tokens beside a few
        # fresh prompts; and rate 16 of the serving benchmark: ~20 decodes beside one prompt.
        "960 dec@200+32x128": ([1] * 960 + [128] * 32, [200] * 960 + [128] * 32),
        "20 dec@1100+1024": ([1] * 20 + [1024], [1100] * 20 + [1024]),
        # Decodes alone: how the Mosaic kernel's decode items stream (Triton has split-K).
        "128 dec@2048": ([1] * 128, [2048] * 128),
    }
    rows = []
    for name, (q_lens, kv_lens) in cases.items():
        configs = [None] + (mixed_sweep_configs() if args.sweep else args.configs)
        arg_sets = make_inputs(q_lens, kv_lens, args.page_size)
        extra = mgpu_entries(arg_sets)
        point = bench_point(args, name, arg_sets, kv_lens, configs, extra)
        print_rows(point)
        rows += point
    return rows


def bench_prefill(args) -> list[dict]:
    """Dense causal prefill: cuDNN flash attention against our kernel on one request."""
    rows = []
    for length in args.prefill_lens:
        flops = 4 * NUM_HEADS * HEAD_DIM * length * length / 2  # causal: half the matrix
        key = jax.random.key(1)
        q = jax.random.normal(key, (1, length, NUM_HEADS, HEAD_DIM), DTYPE)
        kv = jax.random.normal(key, (1, length, NUM_KV_HEADS, HEAD_DIM), DTYPE)
        dense = jax.jit(
            functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
        )
        try:
            jax.block_until_ready(dense(q, kv, kv))
            extra = {"cudnn": (dense, [(q, kv, kv)])}
        except Exception as e:
            tqdm.write(f"  cudnn failed: {type(e).__name__}: {str(e)[:200]}")
            extra = {}
        extra.update(dense_pallas_baselines(q, kv))
        configs = [None] + (prefill_sweep_configs() if args.sweep else args.configs)
        arg_sets = make_inputs([length], [length], args.page_size)
        extra.update(mgpu_entries(arg_sets))
        point = bench_point(args, f"prefill {length}", arg_sets, [length], configs, extra)
        for r in point:
            r["tflops"] = flops / (r["device_us"] or r["wall_us"]) / 1e6
        print_rows(point, extra_cols=("tflops",))
        rows += point
    return rows


def dense_pallas_baselines(q: jax.Array, kv: jax.Array) -> dict:
    """jax's own dense causal attention kernels on the same prefill: the Triton flash attention
    (`pallas.ops.gpu.attention.mha`, k/v repeated to every q head) and the FlashAttention-3
    port on Mosaic GPU (`attention_mgpu`, Hopper: TMA, wgmma, warp specialization). What a
    Pallas kernel reaches with each lowering, without pages."""
    out = {}
    scale = HEAD_DIM**-0.5
    try:
        from jax.experimental.pallas.ops.gpu import attention as triton_attn

        kv_rep = jnp.repeat(kv, GROUP, axis=2)
        for stages in (2, 3):
            fn = jax.jit(
                functools.partial(
                    triton_attn.mha,
                    segment_ids=None,
                    sm_scale=scale,
                    causal=True,
                    num_stages=stages,
                )
            )
            jax.block_until_ready(fn(q, kv_rep, kv_rep))
            out[f"jax_triton_mha_st{stages}"] = (fn, [(q, kv_rep, kv_rep)])
    except Exception as e:
        tqdm.write(f"  jax triton mha failed: {type(e).__name__}: {str(e)[:300]}")
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

        for block_kv in (64, 128):
            cfg = mgpu.TuningConfig(
                block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True
            )
            fn = jax.jit(functools.partial(mgpu.attention, config=cfg))
            # float16: its shared-memory tiles are float16 (same MMA rate as bfloat16); it
            # takes no scale (softmax(q k^T)), which changes no timing
            args16 = (q.astype(jnp.float16), kv.astype(jnp.float16), kv.astype(jnp.float16))
            jax.block_until_ready(fn(*args16))
            out[f"jax_mgpu_fa3_kv{block_kv}"] = (fn, [args16])
    except Exception as e:
        tqdm.write(f"  jax mosaic gpu attention failed: {type(e).__name__}: {str(e)[:300]}")
    return out


def bench_kv_write(args) -> list[dict]:
    """The KV write of one layer (`write_kv_reference`, an XLA scatter told its indices are
    unique) against the same scatter without the hint, 32 layers a call as in the model."""
    from pallas_kernels.reference import kv_cache_shape, write_kv_reference

    def plain(kv_cache, k, v, slot_ids):
        two, kh, pages, size, hd = kv_cache.shape
        flat = kv_cache.reshape(two, kh, pages * size, hd)
        new = jnp.stack([k, v]).transpose(0, 2, 1, 3).astype(kv_cache.dtype)
        return flat.at[:, :, slot_ids].set(new).reshape(kv_cache.shape)

    layers, pages = 32, 4096
    shape = kv_cache_shape(pages, args.page_size, NUM_KV_HEADS, HEAD_DIM)
    rng = np.random.default_rng(0)
    rows = []
    for tokens in (1, 256, 2048):
        slots = rng.permutation(np.arange(args.page_size, pages * args.page_size))[:tokens]
        slots = jnp.asarray(slots, jnp.int32)
        k = jax.random.normal(jax.random.key(1), (layers, tokens, NUM_KV_HEADS, HEAD_DIM), DTYPE)
        for name, fn in (("unique", write_kv_reference), ("plain", plain)):
            step = jax.jit(
                lambda caches, k, s, fn=fn: [fn(c, k[i], k[i], s) for i, c in enumerate(caches)],
                donate_argnums=0,
            )
            caches = step([jnp.zeros(shape, DTYPE) for _ in range(layers)], k, slots)
            jax.block_until_ready(caches)
            t = time.perf_counter()
            for _ in range(args.inner):
                caches = step(caches, k, slots)
            jax.block_until_ready(caches)
            us = (time.perf_counter() - t) / args.inner / layers * 1e6
            rows.append(dict(tokens=tokens, variant=name, us_per_layer=us))
            tqdm.write(f"    kv write T={tokens:5d} {name:7s} {us:8.2f} us a layer")
            del caches
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-json", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--parts", nargs="+", default=["decode", "mixed", "prefill"])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--peak-tbps", type=float, help="HBM bandwidth; default: PEAK_TBPS")
    parser.add_argument("--sweep", action="store_true", help="time ~20 tile configs per point")
    parser.add_argument(
        "--configs", nargs="+", default=[], type=parse_config, help="also time q4/kv128/s1/w4/st3.."
    )
    parser.add_argument("--quick", action="store_true", help="B in {1,32,256}, ctx in {2048}")
    parser.add_argument(
        "--engine-buckets",
        action="store_true",
        help="decode: pad each batch to the token and request buckets of the engine's default "
        "ladders (`engine_decode_buckets`), so that `default` is the config the engine runs",
    )
    args = parser.parse_args()
    if args.quick:
        args.batches, args.contexts, args.prefill_lens = [1, 32, 256], [2048], [2048]
    device = jax.devices()[0]
    assert device.platform == "gpu", f"needs a GPU, got {device.platform}"
    copy_tbps = measure_copy_tbps()
    known = next((v for k, v in PEAK_TBPS.items() if k in device.device_kind), None)
    args.peak_tbps = args.peak_tbps or known or copy_tbps
    tqdm.write(
        f"{device.device_kind}, jax {jax.__version__}: peak {args.peak_tbps} TB/s "
        f"(XLA copy here: {copy_tbps:.3f})"
    )
    result = dict(
        device=device.device_kind,
        jax=jax.__version__,
        copy_tbps=copy_tbps,
        peak_tbps=args.peak_tbps,
        page_size=args.page_size,
        heads=[NUM_HEADS, NUM_KV_HEADS, HEAD_DIM],
        dtype="bfloat16",
        date=time.strftime("%Y-%m-%d"),
    )
    parts = dict(
        decode=bench_decode, mixed=bench_mixed, prefill=bench_prefill, kv_write=bench_kv_write
    )
    for part in args.parts:
        tqdm.write(f"== {part}")
        result[part] = parts[part](args)
        with open(args.output_json, "w") as f:  # after each part: a killed run keeps the rest
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
