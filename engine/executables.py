"""Building a runner's executables at start-up: each one a `CompileJob` (a `jax.jit` function
on abstract arguments), looked up in the `ExecutableCache` or traced here and compiled by XLA
in a pool of threads, and the XLA options each forward bucket compiles with on NVIDIA GPUs."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from tqdm import tqdm

from engine.executable_cache import ExecutableCache
from engine.step_input import StepLayout
from pallas_kernels import hardware

logger = logging.getLogger(__name__)

# XLA splits the K dimension of a decode step's Triton GEMMs to occupy every SM: each split
# writes float32 partials [splits, T, N] that a separate fusion sums (with the residual add).
# At 64-127 tokens (the band measured; below `cublas_min_tokens` only) that costs more than
# it gains. On an H100, 64 requests of 512 + 256 tokens (`bench latency`, alternated)
# decoded in 8.52-8.56 ms a step without split-K against 8.74-8.77 with it: 421 -> 372
# kernels a step, and XLA picks cuBLAS for o_proj and down_proj. At 32 tokens the device
# time was the same (7.65 against 7.63 ms at 1,100 tokens of context) with 0.4 ms more host
# time a call; at 16 split-K gains (batch 1: 5.94 against 6.08 ms). docs/BENCHMARKS.md,
# fourteenth session.
NO_SPLIT_K_MIN_TOKENS, NO_SPLIT_K_MAX_TOKENS = 64, 127
NO_SPLIT_K = {"xla_gpu_experimental_force_split_k": 1}


class CompileJob(NamedTuple):
    """One executable to build at start-up, for `table[key]`: `fn` (a `jax.jit` function)
    lowered on `args` (abstract arrays) and `static` (its static arguments, by name)."""

    table: dict
    key: object
    fn: Any
    args: tuple
    static: dict
    options: dict | None = None  # XLA compile options (`compiler_options`)

    def lower(self) -> jax.stages.Lowered:
        return self.fn.lower(*self.args, **self.static)

    @property
    def name(self) -> str:
        """For logs: the function and its table key."""
        return f"{self.fn.__name__}[{self.key}]"

    def signature(self) -> tuple:
        """What shapes the program besides the code: the function, every argument's shape,
        dtype and sharding, the static arguments and the compile options."""
        leaves, tree = jax.tree.flatten(self.args)
        arrays = [(a.shape, str(a.dtype), str(a.sharding)) for a in leaves]
        return (self.fn.__name__, str(tree), arrays, sorted(self.static.items()), self.options)


def build(
    jobs: list[CompileJob],
    *,
    cache: ExecutableCache | None,
    model_key: str | None,
    devices: list[jax.Device],
) -> int:
    """Fill every job's `table[key]` (with a progress bar). With a cache, each executable is
    first looked up in it (no tracing). The rest are traced in this thread and compiled by XLA
    in a thread pool, one per core, each as soon as it is lowered (compiling overlaps the
    tracing of the next ones), then stored in the cache. Returns how many were loaded."""
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="compiling buckets", leave=False)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        keys = [cache and cache.key(model_key, job.signature()) for job in jobs]
        loads = [cache and pool.submit(cache.load, key, [*devices]) for key in keys]
        compiles = {}
        for job, key, load in zip(jobs, keys, loads, strict=True):
            compiled = load and load.result()
            if compiled:
                job.table[job.key] = compiled
                bar.update()
            else:
                t = time.perf_counter()
                lowered = job.lower()
                logger.debug("lowered %s in %.2f s", job.name, time.perf_counter() - t)
                compiles[pool.submit(_compile, lowered, job.options, cache, key)] = job
        t1 = time.perf_counter()
        storing, slowest = 0.0, (0.0, None)
        for future in concurrent.futures.as_completed(compiles):
            job = compiles[future]
            job.table[job.key], seconds, storing_seconds = future.result()
            logger.debug("compiled %s in %.2f s", job.name, seconds)
            storing += storing_seconds
            slowest = max(slowest, (seconds, job.name), key=lambda s: s[0])
            bar.update()
    bar.close()
    loaded = len(jobs) - len(compiles)
    logger.info(
        "%d executables: %d from the executable cache, %d traced and lowered, in %.1f s; "
        "all compiled %.1f s later (storing them took %.1f s of the pool's threads)%s",
        len(jobs), loaded, len(compiles), t1 - t0, time.perf_counter() - t1, storing,
        "; the slowest compile, {:.1f} s: {}".format(*slowest) if compiles else "",
    )  # fmt: skip
    return loaded


def _compile(lowered, options: dict | None, cache: ExecutableCache | None, key: str | None):
    """XLA-compile one lowered executable (in a pool thread), through the cache if there is
    one: (the executable, seconds compiling it, seconds storing it)."""
    t0 = time.perf_counter()
    if cache is None:
        return lowered.compile(compiler_options=options), time.perf_counter() - t0, 0.0
    compiled, storing = cache.compile(lowered, key, options)
    return compiled, time.perf_counter() - t0 - storing, storing


def compiler_options(layout: StepLayout, cublas_min_tokens: int | None) -> dict | None:
    """XLA options for one forward bucket on a CUDA GPU: from `cublas_min_tokens` tokens, no
    Triton GEMMs, so XLA's dots go to cuBLAS (see `engine.config.parse_gpu_gemm`); below
    that, from `NO_SPLIT_K_MIN_TOKENS` to `NO_SPLIT_K_MAX_TOKENS`, no split-K (`NO_SPLIT_K`;
    XLA then takes cuBLAS for some of the dots itself)."""
    if cublas_min_tokens is None or not hardware.is_nvidia():
        return None
    if layout.num_tokens >= cublas_min_tokens:
        return {"xla_gpu_enable_triton_gemm": False}
    if NO_SPLIT_K_MIN_TOKENS <= layout.num_tokens <= NO_SPLIT_K_MAX_TOKENS:
        return dict(NO_SPLIT_K)
    return None


def compile_order(layout: StepLayout, cublas_min_tokens: int | None) -> tuple:
    """Forward buckets, slowest to compile first. On NVIDIA GPUs, the buckets whose dots XLA
    autotunes as Triton GEMMs (below `cublas_min_tokens`), smallest first: 17-26 s of a
    compile thread for 16 and 32 tokens on an H200 (10 s for 128 when it was below the
    threshold), against 4-6 s for the cuBLAS buckets. Elsewhere, and then, the biggest
    steps first."""
    autotuned = hardware.is_nvidia() and (
        cublas_min_tokens is None or layout.num_tokens < cublas_min_tokens
    )
    return (not autotuned, layout.num_tokens if autotuned else -layout.num_tokens)


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a pytree of arrays (lowering without the data)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def whole(
    dtype: jnp.dtype, where: jax.sharding.Sharding | None, *shape: int
) -> jax.ShapeDtypeStruct:
    """An abstract argument whole on every device of `where` (None: the default device)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=where)
