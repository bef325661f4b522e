"""The one attention entry point the models call, and the metadata it reads.

Backends: `reference` (plain jnp, any platform: the blocked jnp attention of cpu_attention.py,
tested against reference.py), `pallas` (GPU Triton / TPU Mosaic kernels, when
their modules are present), `auto` (pallas on GPU/TPU, reference on CPU).
"""

from __future__ import annotations

import dataclasses
import enum

import jax

from pallas_kernels.cpu_attention import ragged_paged_attention_blocked
from pallas_kernels.reference import write_kv_reference


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where a ragged token batch reads and writes the paged KV cache (see reference.py)."""

    slot_ids: jax.Array  # [T] int32: cache slot each new token's K/V is written to
    page_table: jax.Array  # [R, P] int32: page ids of each request, 0-padded
    kv_lens: jax.Array  # [R] int32: context length including this step's tokens
    query_start: jax.Array  # [R + 1] int32: cumulative query lengths
    num_seqs: jax.Array  # [1] int32: real requests (the rest is padding)
    # The GPU kernel the engine picked for this step's bucket ("triton" / "mgpu"; static), or
    # None for the dispatch's own choice (pallas_kernels/dispatch.py).
    gpu_kernel: str | None = dataclasses.field(default=None, metadata=dict(static=True))


# `PAGEJAX_GPU_ATTENTION=auto` on Hopper (dispatch.py): steps of long prompt chunks run on the
# Mosaic GPU kernel, the rest on Triton.
MGPU_MIN_STEP_TOKENS = 2048
MGPU_TOKENS_PER_REQUEST = 16


def mosaic_suits(num_tokens: int, num_requests: int) -> bool:
    """`auto`'s rule: a step of long prompt chunks, at least `MGPU_MIN_STEP_TOKENS` tokens and
    at most one request per `MGPU_TOKENS_PER_REQUEST` of them, runs on the Mosaic GPU kernel."""
    return (
        num_tokens >= MGPU_MIN_STEP_TOKENS and num_requests * MGPU_TOKENS_PER_REQUEST <= num_tokens
    )


class AttentionBackend(enum.Enum):
    AUTO = "auto"
    PALLAS = "pallas"
    REFERENCE = "reference"
    # The GPU / TPU kernels run by Pallas' interpreters on any platform: slow, for tests that
    # check the kernels inside the whole engine on the CPU.
    PALLAS_INTERPRET_GPU = "pallas-interpret-gpu"
    PALLAS_INTERPRET_TPU = "pallas-interpret-tpu"


def resolve_backend(
    backend: AttentionBackend | str, platform: str | None = None
) -> AttentionBackend:
    """`auto` -> pallas on gpu/tpu, reference elsewhere."""
    backend = AttentionBackend(backend)
    if backend is not AttentionBackend.AUTO:
        return backend
    platform = platform or jax.default_backend()
    return (
        AttentionBackend.PALLAS
        if platform in ("gpu", "cuda", "tpu")
        else AttentionBackend.REFERENCE
    )


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
    backend: AttentionBackend = AttentionBackend.REFERENCE,
) -> tuple[jax.Array, jax.Array]:
    """Write this step's K/V into the cache (unless the caller did), then attend.

    q: [T, N, H]; k, v: [T, K, H], or both None where the caller wrote them (a fused decode
    layer's qkv: pallas_kernels/gpu_decode_matmul.py); kv_cache: [2, K, num_pages, S, H].
    Returns (out [T, N, H], updated kv_cache).
    """
    assert (k is None) == (v is None), "k and v: both written by the caller, or neither"
    interpreted = {
        AttentionBackend.PALLAS_INTERPRET_GPU: "gpu",
        AttentionBackend.PALLAS_INTERPRET_TPU: "tpu",
    }
    if backend is AttentionBackend.PALLAS or backend in interpreted:
        from pallas_kernels import dispatch  # kernels import lazily: CPU never needs them

        return dispatch.paged_attention(
            q,
            k,
            v,
            kv_cache,
            meta,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            platform=interpreted.get(backend),
            interpret=backend in interpreted,
        )
    if k is not None:
        kv_cache = write_kv_reference(kv_cache, k, v, meta.slot_ids)
    # The jnp backend walks only the pages the batch needs (cpu_attention.py); it is tested
    # against the readable reference, which gathers max_model_len keys for every token.
    out = ragged_paged_attention_blocked(
        q,
        kv_cache,
        meta.kv_lens,
        meta.page_table,
        meta.query_start,
        meta.num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return out, kv_cache
