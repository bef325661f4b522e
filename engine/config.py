"""Engine configuration: one frozen dataclass per concern, composed into `EngineConfig`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """Which checkpoint, in which dtype, with which attention backend."""

    model: str | None = None  # folder or .gguf file; None = the embedded default model
    dtype: str = "auto"  # auto = bfloat16 on accelerators, float32 on the CPU
    load_format: str = "auto"  # auto | safetensors | gguf | orbax | dummy
    attention_backend: str = "auto"  # auto | pallas | reference
    seed: int = 0
    skip_tokenizer_init: bool = False
    # Split each layer's heads and MLP width (and the KV cache) over this many devices.
    tensor_parallel_size: int = 1
    # On an accelerator mesh, a warm-up call or a step's wait that has not returned in this
    # many seconds ends the process (`engine.watchdog`); 0 = never.
    mesh_timeout_s: float = 120.0

    def __post_init__(self):
        if not self.mesh_timeout_s >= 0:  # NaN too
            raise ValueError(
                f"mesh_timeout_s must be >= 0 seconds (0: no limit), not {self.mesh_timeout_s!r}"
            )


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """KV cache size: `num_pages` if given, else `kv_cache_memory_bytes`, else a fraction of the
    device's memory left after the weights (`gpu_memory_utilization` of the total)."""

    page_size: int = 16
    num_pages: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError("num_pages must be at least 2 (page 0 is the padding page)")


CUBLAS_MIN_TOKENS = 128  # see `parse_gpu_gemm`


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Shapes compiled at start-up. Empty ladders mean "platform default" (`bucket_ladder`)."""

    token_buckets: tuple[int, ...] = ()
    request_buckets: tuple[int, ...] = ()
    compilation_cache_dir: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get(
            "PAGEJAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "pagejax" / "xla")
        )
    )
    # On CUDA GPUs, forward buckets of at least this many tokens compile with XLA's Triton
    # GEMMs off, so XLA's dots go to cuBLAS; None leaves the choice to XLA's autotuner.
    # The CLI reads it from `PAGEJAX_GPU_GEMM` (`parse_gpu_gemm`).
    cublas_min_tokens: int | None = CUBLAS_MIN_TOKENS

    def __post_init__(self) -> None:
        for name in ("token_buckets", "request_buckets"):
            ladder = getattr(self, name)
            if any(n < 1 for n in ladder) or list(ladder) != sorted(set(ladder)):
                raise ValueError(f"{name} must be positive and ascending, got {list(ladder)}.")


def parse_gpu_gemm(value: str) -> int | None:
    """`PAGEJAX_GPU_GEMM` (auto | xla | a number of tokens) -> `cublas_min_tokens`.

    cuBLAS beats XLA's Triton GEMMs on decode steps from 32 tokens, but XLA re-records the
    forward's CUDA graph on every call, which costs more host time with cuBLAS: up to 64
    tokens the host then sets the step's pace, so auto starts at 128 (docs/BENCHMARKS.md,
    tenth session).
    """
    if value == "auto":
        return CUBLAS_MIN_TOKENS
    if value == "xla":
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(f"PAGEJAX_GPU_GEMM must be auto, xla or a number of tokens, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step and of the waiting queue."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    max_waiting_requests: int | None = None
    # At most this many prompt tokens of one request per step (0 = no cap). Small chunks let
    # the running requests decode inside the time the prompt takes anyway (see BENCHMARKS.md).
    long_prefill_token_threshold: int = 0
    # A waiting request is admitted only if the pages that the running ones (and it) need for
    # the rest of their prompts and their next `admission_horizon` tokens (at most their
    # max_tokens) stay free. 0 admits whenever the chunk fits, as vLLM does: the running
    # requests then preempt each other as they grow, and each preemption redoes a prompt
    # (62 of them cost 7 % of a 1000 x 1024-in / 128-out run at 1,024 requests a step).
    admission_horizon: int = 128
    # Decode steps run padded to the next token bucket, and from this many tokens the padded
    # rows cost matmul time (the matmuls turn compute-bound: ~260 tokens for bf16 weights on
    # an H100, 789 TFLOP/s against 3.0 TB/s). So when the KV cache would stop admission just
    # past a bucket B (fewer than 3/4 of the next bucket, itself at least this size), running
    # requests stop at B. 1000 x 1024-in / 128-out at 1,024 requests a step ran ~298 at once,
    # padded to 512: 32,386 tok/s on an H100, against 33,352 stopping at 256 (BENCHMARKS.md).
    # 0: no such stop. Needs token buckets and admission_horizon > 0.
    compute_bound_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0 (0 = no cap).")
        if self.admission_horizon < 0:
            raise ValueError("admission_horizon must be >= 0 (0 = no reserve).")
        if self.compute_bound_tokens < 0:
            raise ValueError("compute_bound_tokens must be >= 0 (0 = no stop at buckets).")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}.")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit in one step's budget.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_model_len ({self.max_model_len}) when chunked prefill is off."
            )


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    load: LoadConfig = LoadConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    # A factory: CompileConfig's default cache folder reads the environment when built.
    compile: CompileConfig = dataclasses.field(default_factory=CompileConfig)
    # Append one JSON line of timings per engine step here (`StepTrace`); None = off.
    step_trace_path: str | None = None

    def __post_init__(self) -> None:
        # The largest bucket must hold the largest step.
        tokens, requests = self.compile.token_buckets, self.compile.request_buckets
        limits = self.scheduler
        if tokens and tokens[-1] < limits.max_num_batched_tokens:
            raise ValueError(
                f"token_buckets must reach max_num_batched_tokens "
                f"({limits.max_num_batched_tokens}); the largest is {tokens[-1]}."
            )
        if requests and requests[-1] < limits.max_num_seqs:
            raise ValueError(
                f"request_buckets must reach max_num_seqs ({limits.max_num_seqs}); the largest "
                f"is {requests[-1]}."
            )


def bucket_ladder(
    smallest: int, largest: int, factor: int = 2, *, midpoints_from: int | None = None
) -> tuple[int, ...]:
    """`smallest * factor**i` up to `largest`, which is always the last rung; from the rung
    `midpoints_from` on, also 1.5x each rung (between it and the next)."""
    ladder, size = [], smallest
    while size < largest:
        ladder.append(size)
        if midpoints_from is not None and size >= midpoints_from and size * 3 // 2 < largest:
            ladder.append(size * 3 // 2)
        size *= factor
    return (*ladder, largest)
