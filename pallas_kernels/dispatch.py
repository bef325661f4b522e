"""The Pallas attention backend: write this step's K/V, then run the platform's kernel.

KV write: the jnp scatter of reference.py, not a kernel of our own. Inside the model's jit the
cache is donated, so XLA updates it in place, and it fuses the stack/transpose of k and v into
the scatter. Told that its indices are unique, XLA's scatter beat a Pallas write kernel
(input_output_aliases, one program per 16 tokens and kv head) on an H100: 8.3 against 12.2 us
a layer for 2,048 tokens, 3.9 against 5.6 us for 256; without the hint it took 40.5 and 7.6 us
(docs/kernel_notes.md; `scripts/bench_kernels.py --parts kv_write` times the scatter).
"""

from __future__ import annotations

import jax

from pallas_kernels import gpu_ragged_paged_attention as gpu
from pallas_kernels import tpu_ragged_paged_attention as tpu
from pallas_kernels.attention import AttentionMetadata
from pallas_kernels.reference import write_kv_reference

_GPU_PLATFORMS = ("gpu", "cuda")


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
        out = gpu.ragged_paged_attention(*args, **kwargs, interpret=interpret)
    else:
        raise ValueError(
            f"no Pallas kernel for platform {platform!r}: use the reference backend, or pass "
            "platform='gpu'/'tpu' with interpret=True"
        )
    return out, kv_cache
