"""The Pallas attention backend: write this step's K/V, then run the platform's kernel.

KV write: the jnp scatter of reference.py, not a kernel of our own. Inside the model's jit the
cache is donated, so XLA updates it in place, and it fuses the stack/transpose of k and v into
the scatter. Told that its indices are unique, XLA's scatter beat a Pallas write kernel
(input_output_aliases, one program per 16 tokens and kv head) on an H100: 8.3 against 12.2 us
a layer for 2,048 tokens, 3.9 against 5.6 us for 256; without the hint it took 40.5 and 7.6 us
(docs/kernel_notes.md; `scripts/bench_kernels.py --parts kv_write` times the scatter).

GPU kernels: the Triton kernel serves every request. `PAGEJAX_GPU_PREFILL=auto` adds the
Mosaic GPU kernel (gpu_prefill_mgpu.py: 1.26-1.29x cuDNN against Triton's 1.5-1.6x on prefill,
H100) on Hopper in prompt steps: at least `MGPU_MIN_STEP_TOKENS` tokens and at most
`MGPU_MAX_REQUESTS` requests, where the requests with `MGPU_MIN_Q_LEN` new tokens or more go to
it. Two launches: the Mosaic kernel writes the chunks' rows, then Triton writes the other rows
(decodes, padding) into the same buffer (aliased). `mgpu` splits every step the kernel
supports; `triton` (the default) never does.
- Steps with many decodes keep one launch: there the two launches run one after the other,
  where Triton's one launch overlaps the decodes' streaming with the chunks' compute (split
  there, 1000 x 1024/128 ran 0.5 % and 128/128 1.9 % slower on an H100).
- `auto` is opt-in. With the engine's bucket ladders a step of 2,048 tokens or more runs in
  the top request bucket, so the rule fires only when max_num_seqs <= 16: not in the server
  (256) nor in the offline default (1,024 on big cards). There it gained 1.2 % on long prompts
  (H100), and each executable holding a Mosaic kernel added ~0.7 s to start-up, warm cache or
  not (13.6 against 11.4 s for 3 such layouts). A static rule cannot tell prompt steps from
  mixed ones in the top bucket: one Mosaic launch that also takes the decodes would.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels import gpu_prefill_mgpu as mgpu
from pallas_kernels import gpu_ragged_paged_attention as gpu
from pallas_kernels import tpu_ragged_paged_attention as tpu
from pallas_kernels.attention import AttentionMetadata
from pallas_kernels.reference import write_kv_reference

_GPU_PLATFORMS = ("gpu", "cuda")
MGPU_MIN_STEP_TOKENS = 2048
MGPU_MAX_REQUESTS = 16
MGPU_MIN_Q_LEN = 128  # one Mosaic tile (two warpgroups of 64 rows)


@functools.cache
def _is_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def _use_mgpu(
    q: jax.Array, kv_cache: jax.Array, num_requests: int, sliding_window, soft_cap, interpret
) -> bool:
    choice = os.environ.get("PAGEJAX_GPU_PREFILL", "triton")
    if choice not in ("auto", "triton", "mgpu"):
        raise ValueError(f"PAGEJAX_GPU_PREFILL must be auto, triton or mgpu, got {choice!r}")
    head_dim, page_size = q.shape[-1], kv_cache.shape[3]
    fits = mgpu.supports(q.dtype, kv_cache.dtype, head_dim, page_size, sliding_window, soft_cap)
    if interpret or not fits or choice == "triton":  # no interpreter runs Mosaic GPU kernels
        return False
    prompt_step = q.shape[0] >= MGPU_MIN_STEP_TOKENS and num_requests <= MGPU_MAX_REQUESTS
    return choice == "mgpu" or (prompt_step and _is_hopper())


def gpu_attention(args: tuple, *, sm_scale: float, use_mgpu: bool, **kwargs) -> jax.Array:
    """The GPU kernels on (q, kv_cache, kv_lens, page_table, query_start, num_seqs): Triton
    alone, or Triton for the short requests and Mosaic GPU for the prompt chunks."""
    if not use_mgpu:
        return gpu.ragged_paged_attention(*args, sm_scale=sm_scale, **kwargs)
    _, kv_lens, _, query_start, num_seqs = args[1:]
    real = jnp.arange(kv_lens.shape[0]) < jnp.reshape(num_seqs, ())
    long = real & (query_start[1:] - query_start[:-1] >= MGPU_MIN_Q_LEN)
    long = jnp.concatenate([long, jnp.zeros((1,), bool)])  # the padding rows stay with Triton
    out = mgpu.ragged_paged_prefill(*args, sm_scale=sm_scale, active=long, min_q_len=MGPU_MIN_Q_LEN)
    return gpu.ragged_paged_attention(*args, sm_scale=sm_scale, active=~long, out=out, **kwargs)


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_cache: jax.Array,
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    platform: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Write this step's K/V into the cache, then ragged paged attention.

    q: [T, N, H]; k, v: [T, K, H]; kv_cache: [2, K, num_pages, S, H].
    Returns (out [T, N, H], updated kv_cache).

    platform: which kernel family ("gpu"/"cuda" or "tpu"); default `jax.default_backend()`.
    interpret: run that kernel in Pallas' interpreter (tests on the CPU); the TPU kernel
    then runs under `pltpu.force_tpu_interpret_mode`, which also simulates its DMAs.
    """
    platform = platform or jax.default_backend()
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
        use_mgpu = _use_mgpu(q, kv_cache, num_requests, sliding_window, soft_cap, interpret)
        out = gpu_attention(args, **kwargs, use_mgpu=use_mgpu, interpret=interpret)
    else:
        raise ValueError(
            f"no Pallas kernel for platform {platform!r}: use the reference backend, or pass "
            "platform='gpu'/'tpu' with interpret=True"
        )
    return out, kv_cache
