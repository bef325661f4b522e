"""The Pallas attention backend: write this step's K/V (unless the caller did), then run the
platform's kernel.

KV write: the jnp scatter of reference.py, not a kernel of our own. Inside the model's jit the
cache is donated, so XLA updates it in place, and it fuses the stack/transpose of k and v into
the scatter. Told that its indices are unique, XLA's scatter beat a Pallas write kernel
(input_output_aliases, one program per 16 tokens and kv head) on an H100: 8.3 against 12.2 us
a layer for 2,048 tokens, 3.9 against 5.6 us for 256; without the hint it took 40.5 and 7.6 us
(docs/kernel_notes.md; `scripts/bench_kernels.py --parts kv_write` times the scatter). A fused
decode layer (pallas_kernels/decode_matmul.py) writes K/V in its qkv matmul's epilogue instead
and passes k = v = None.

GPU kernels (`PAGEJAX_GPU_ATTENTION`): `auto`, the default, runs steps of long prompt chunks on
the Mosaic GPU kernel on Hopper (gpu_mosaic_attention.py: one persistent launch for prompt
tiles and decodes) and the rest on the Triton kernel (gpu_ragged_paged_attention.py): the
engine compiles each bucket of `MGPU_MIN_STEP_TOKENS` tokens or more on both and picks per step
by its actual requests, at most one per `MGPU_TOKENS_PER_REQUEST` tokens for Mosaic
(`host_picks_kernel`, `attention.mosaic_suits`, `AttentionMetadata.gpu_kernel`). A caller that
picks nothing gets the same rule on its bucket's shapes. `triton` runs every step on Triton;
`mgpu` every step the Mosaic kernel supports (`gpu_mosaic_attention.supports`: no sliding
window or soft cap, bf16/fp16, head groups a power of two, ...), on Hopper.

Measured (docs/kernel_notes.md, docs/BENCHMARKS.md), per layer on an H100: the Mosaic kernel is
1.11-1.22x cuDNN on dense prefill against Triton's 1.5-1.6x, and 9 % faster on 248 decodes
beside 8 prompts of 968 tokens. Triton is faster on small steps with many decodes (split-K
spreads a few long decodes over more SMs), and on 128-token prompts beside ~470 decodes in
8,192-token steps (189 against 195 ms a step), where the Mosaic kernel's items are many and
tiny; the request rule keeps those on Triton. End to end on an H200: one prompt of 4,096 /
8,000 tokens 3 / 7 % sooner to its first token, 1000 x 1024/128 at 256 requests +0.4 %. The
cost is start-up: lowering the Mosaic kernel takes 1.5-2.9 s per bucket in a cold start
(3.3-8.4 s before `mgpu_compat.ask_ptxas_once`); none warm, since the executable cache keeps
the executables.
"""

from __future__ import annotations

import os

import jax

from pallas_kernels import gpu_mosaic_attention as mgpu
from pallas_kernels import gpu_ragged_paged_attention as gpu
from pallas_kernels import hardware
from pallas_kernels import tpu_ragged_paged_attention as tpu
from pallas_kernels.attention import AttentionMetadata, mosaic_suits
from pallas_kernels.reference import write_kv_reference

_GPU_PLATFORMS = ("gpu", "cuda")


def gpu_attention_choice() -> str:
    """`PAGEJAX_GPU_ATTENTION`: auto (the default), triton or mgpu."""
    choice = os.environ.get("PAGEJAX_GPU_ATTENTION", "auto")
    if choice not in ("auto", "triton", "mgpu"):
        raise ValueError(f"PAGEJAX_GPU_ATTENTION must be auto, triton or mgpu, got {choice!r}")
    return choice


def host_picks_kernel(
    dtype, head_dim: int, page_size: int, sliding_window, soft_cap, *, num_heads, num_kv_heads
) -> bool:
    """Whether the engine should compile each bucket of `MGPU_MIN_STEP_TOKENS` tokens or more
    twice, on each kernel, and pick per step by its actual requests (`mosaic_suits`): `auto`
    on Hopper, for a model the Mosaic GPU kernel supports. A bucket's padded request count
    says little about its steps: with 1,024 requests a step, every large bucket has R = 1,024
    and the bucket rule alone would never pick the Mosaic kernel."""
    return (
        hardware.is_hopper()
        and gpu_attention_choice() == "auto"
        and mgpu.supports(
            dtype,
            dtype,
            head_dim,
            page_size,
            sliding_window,
            soft_cap,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
        )
    )


def _use_mgpu(
    q: jax.Array,
    kv_cache: jax.Array,
    num_requests: int,
    sliding_window,
    soft_cap,
    interpret,
    kernel: str | None = None,
) -> bool:
    """Whether this step runs on the Mosaic GPU kernel: `kernel` ("mgpu" / "triton") when the
    engine picked it (`AttentionMetadata.gpu_kernel`), else `PAGEJAX_GPU_ATTENTION` and, for
    `auto`, `mosaic_suits` on the bucket's shapes."""
    choice = gpu_attention_choice()
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, page_size = kv_cache.shape[1], kv_cache.shape[3]
    fits = mgpu.supports(
        q.dtype,
        kv_cache.dtype,
        head_dim,
        page_size,
        sliding_window,
        soft_cap,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
    )
    if kernel == "mgpu" and not fits:
        raise ValueError("the Mosaic GPU kernel does not support this model's attention")
    # Interpret mode stays on Triton: Mosaic GPU's interpreter runs this kernel only with jax
    # 0.11, and slowly (~20 s for a 160-token batch; its tests call it directly).
    if interpret or not fits or not hardware.is_hopper():
        return False
    if kernel is not None:
        return kernel == "mgpu"
    return choice == "mgpu" or (choice == "auto" and mosaic_suits(q.shape[0], num_requests))


def gpu_attention(args: tuple, *, sm_scale: float, use_mgpu: bool, **kwargs) -> jax.Array:
    """The GPU kernels on (q, kv_cache, kv_lens, page_table, query_start, num_seqs): Triton,
    or Mosaic GPU (which takes no sliding window or soft cap: `mgpu.supports`)."""
    if use_mgpu:
        if kwargs.get("sliding_window") is not None or kwargs.get("soft_cap") is not None:
            raise ValueError("the Mosaic GPU kernel takes no sliding window or soft cap")
        return mgpu.ragged_paged_attention(*args, sm_scale=sm_scale)
    return gpu.ragged_paged_attention(*args, sm_scale=sm_scale, **kwargs)


def paged_attention(
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array | None,
    kv_cache: jax.Array,
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    platform: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Write this step's K/V into the cache (unless the caller did), then ragged paged
    attention.

    q: [T, N, H]; k, v: [T, K, H] (None: already written); kv_cache: [2, K, num_pages, S, H].
    Returns (out [T, N, H], updated kv_cache).

    platform: which kernel family ("gpu"/"cuda" or "tpu"); default `jax.default_backend()`.
    interpret: run that kernel in Pallas' interpreter (tests on the CPU); the TPU kernel
    then runs under `pltpu.force_tpu_interpret_mode`, which also simulates its DMAs.
    """
    platform = platform or jax.default_backend()
    if k is not None:
        kv_cache = write_kv_reference(kv_cache, k, v, meta.slot_ids)
    args = (q, kv_cache, meta.kv_lens, meta.page_table, meta.query_start, meta.num_seqs)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if platform == "tpu":
        if interpret:
            from jax.experimental.pallas import tpu as pltpu

            with pltpu.force_tpu_interpret_mode():
                out = tpu.ragged_paged_attention(*args, **kwargs)
        else:
            out = tpu.ragged_paged_attention(*args, **kwargs)
    elif platform in _GPU_PLATFORMS:
        num_requests = meta.kv_lens.shape[0]
        use_mgpu = _use_mgpu(
            q, kv_cache, num_requests, sliding_window, soft_cap, interpret, meta.gpu_kernel
        )
        out = gpu_attention(args, **kwargs, use_mgpu=use_mgpu, interpret=interpret)
    else:
        raise ValueError(
            f"no Pallas kernel for platform {platform!r}: use the reference backend, or pass "
            "platform='gpu'/'tpu' with interpret=True"
        )
    return out, kv_cache
