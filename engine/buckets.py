"""Which compiled bucket each step runs in. A runner compiles one forward executable per
(T tokens, R requests) bucket: each rung T of its token ladder with the request rungs chosen
for it (`Buckets.request_buckets_for`), twice with kernel twins. Each step runs in the
smallest that holds it (`Buckets.layout_for`), its inputs padded to it."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from engine.config import EngineConfig, bucket_ladder
from engine.step_input import StepLayout, pick_bucket
from engine.types import SchedulerOutput
from pallas_kernels import attention
from pallas_kernels.attention import AttentionBackend

SPLIT_REQUESTS_FROM = 128  # token buckets this large get several request buckets


class Buckets:
    """The token and request ladders of a runner on `platform` ("cpu" or an accelerator), and
    the (T, R) bucket, with its attention kernel, that each step runs in."""

    def __init__(
        self, config: EngineConfig, *, platform: str, pages_per_request: int, kernel_twins: bool
    ):
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.pages_per_request = pages_per_request
        # Each bucket of `MGPU_MIN_STEP_TOKENS` tokens or more compiled on both GPU attention
        # kernels, one picked per step (`layout_for`).
        self.kernel_twins = kernel_twins
        self.token_buckets, self.request_buckets = ladders(config, platform)
        # Each token bucket's request rungs, worked out once rather than every step.
        self._rungs = {t: self.request_buckets_for(t) for t in self.token_buckets}

    def request_buckets_for(self, num_tokens_bucket: int) -> tuple[int, ...]:
        """R buckets compiled with token bucket T: one rung that holds every request the step
        can have (R <= T: a request has >= 1 token) and the rungs within [T / 4, T]. A decode
        batch (T ~ R) gets a tight R; a long prefill step pads its few sampled rows a little.
        Below `SPLIT_REQUESTS_FROM` tokens only the first rung, where it is at most T (the
        default ladder; a sparse ladder of the user's keeps its small rungs): there a smaller
        R saves little (the LM head reads all of its [D, V] weights for any R, and the
        sampler's passes over [R, V] are small), and each R rung is one more forward
        executable whose Triton GEMMs XLA autotunes at start-up (15-26 s of a compile thread
        on an H200)."""
        t, ladder = num_tokens_bucket, self.request_buckets
        top = next((r for r in ladder if r >= min(t, self.max_num_seqs)), ladder[-1])
        if t < SPLIT_REQUESTS_FROM and top <= t:
            return (top,)
        return tuple(sorted({r for r in ladder if t / 4 <= r <= t} | {top}))

    def layout_for(self, sched: SchedulerOutput) -> StepLayout:
        """The compiled (T, R) bucket a scheduled step runs in, and with `kernel_twins`, the
        attention kernel for its actual tokens and requests (`attention.mosaic_suits`)."""
        t = pick_bucket(self.token_buckets, sched.num_batched_tokens)
        r = pick_bucket(self._rungs[t], len(sched.requests))
        kernel = None
        if self._twinned(t):
            suits = attention.mosaic_suits(sched.num_batched_tokens, len(sched.requests))
            kernel = "mgpu" if suits else "triton"
        return StepLayout(t, r, self.pages_per_request, kernel)

    def _twinned(self, num_tokens_bucket: int) -> bool:
        return self.kernel_twins and num_tokens_bucket >= attention.MGPU_MIN_STEP_TOKENS

    def layouts(self) -> list[StepLayout]:
        """Every (T, R) bucket pair the engine can meet (twice with `kernel_twins`)."""
        return [
            StepLayout(t, r, self.pages_per_request, kernel)
            for t in self.token_buckets
            for r in self._rungs[t]
            for kernel in (("triton", "mgpu") if self._twinned(t) else (None,))
        ]


def ladders(config: EngineConfig, platform: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The token and request ladders: the user's, else powers of two up to the scheduler's
    limits (of four on the CPU, with one request bucket)."""
    c, s = config.compile, config.scheduler
    cpu = platform == "cpu"
    # On the CPU every bucket costs seconds of compile time: fewer, coarser rungs.
    # 1.5x rungs from 2,048 tokens (`bucket_ladder(..., midpoints_from=2048)`) save ~40 ms
    # a prefill step that would run padded to 8,192, but cost 13-15 s of cold start-up
    # on an H100 (two A/Bs, docs/BENCHMARKS.md): pass them as --token-buckets if wanted.
    tokens = c.token_buckets or bucket_ladder(16, s.max_num_batched_tokens, 4 if cpu else 2)
    if c.request_buckets:
        requests = c.request_buckets
    elif cpu:
        requests = (s.max_num_seqs,)  # one shape per token bucket
    else:
        requests = bucket_ladder(8, s.max_num_seqs)
    assert tokens[-1] >= s.max_num_batched_tokens and requests[-1] >= s.max_num_seqs
    return tokens, requests


def wants_kernel_twins(model: nnx.Module, dtype: jnp.dtype, page_size: int) -> bool:
    """Whether to compile large buckets on both GPU attention kernels and pick one per step
    (`dispatch.host_picks_kernel`)."""
    if model.model.layers[0].self_attn.backend is not AttentionBackend.PALLAS:
        return False
    from pallas_kernels import dispatch  # the kernel modules, off the CPU's path

    cfg = model.config.shard(model.num_shards)  # a shard's heads
    return dispatch.host_picks_kernel(
        dtype,
        cfg.head_dim,
        page_size,
        cfg.sliding_window,
        None,  # no soft cap in these models
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
    )
