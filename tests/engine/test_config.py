"""Bucket ladders (the step shapes compiled at start-up), the GPU GEMM setting, defaults."""

from __future__ import annotations

import pytest

from engine.config import (
    CUBLAS_MIN_TOKENS,
    CompileConfig,
    EngineConfig,
    SchedulerConfig,
    bucket_ladder,
    parse_gpu_gemm,
)


def test_bucket_ladder_doubles_up_to_the_largest():
    assert bucket_ladder(16, 256) == (16, 32, 64, 128, 256)
    assert bucket_ladder(16, 200) == (16, 32, 64, 128, 200)
    assert bucket_ladder(16, 1024, 4) == (16, 64, 256, 1024)


def test_bucket_ladder_midpoints_from_a_rung():
    assert bucket_ladder(16, 8192, midpoints_from=2048) == (
        16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192,
    )  # fmt: skip
    # A midpoint at or past the largest rung is left out.
    assert bucket_ladder(16, 5000, midpoints_from=2048) == (
        16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 5000,
    )  # fmt: skip
    assert bucket_ladder(16, 6144, midpoints_from=2048)[-3:] == (3072, 4096, 6144)


def test_gpu_gemm_setting_parses_to_a_token_threshold():
    assert parse_gpu_gemm("auto") == CUBLAS_MIN_TOKENS
    assert parse_gpu_gemm("xla") is None
    assert parse_gpu_gemm("128") == 128
    for bad in ("cublas", "", "1.5", "²"):
        with pytest.raises(ValueError, match="PAGEJAX_GPU_GEMM"):
            parse_gpu_gemm(bad)


def test_engine_configs_do_not_share_one_compile_config(monkeypatch):
    """EngineConfig's CompileConfig is built per config, so its environment-read default (the
    compilation cache folder) is read then, not once at import."""
    monkeypatch.setenv("PAGEJAX_COMPILATION_CACHE", "/tmp/one")
    first = EngineConfig()
    monkeypatch.setenv("PAGEJAX_COMPILATION_CACHE", "/tmp/two")
    assert (first.compile.compilation_cache_dir, EngineConfig().compile.compilation_cache_dir) == (
        "/tmp/one",
        "/tmp/two",
    )


@pytest.mark.parametrize(
    "ladder", [(32, 16, 8192), (16, 16, 8192), (0, 8192)], ids=["descending", "repeated", "zero"]
)
def test_a_bucket_ladder_must_be_positive_and_ascending(ladder):
    with pytest.raises(ValueError, match=r"token_buckets must be positive and ascending"):
        CompileConfig(token_buckets=ladder)
    with pytest.raises(ValueError, match=r"request_buckets must be positive and ascending"):
        CompileConfig(request_buckets=ladder)


def test_the_largest_buckets_must_hold_the_largest_step():
    """A step of `max_num_batched_tokens` tokens and `max_num_seqs` requests needs a bucket;
    without one the runner would meet a step it never compiled."""
    limits = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=2048)
    EngineConfig(scheduler=limits, compile=CompileConfig(token_buckets=(16, 2048)))
    short = CompileConfig(token_buckets=(16, 1024))
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(2048\); the largest is 1024"):
        EngineConfig(scheduler=limits, compile=short)
    few = CompileConfig(request_buckets=(8,))
    with pytest.raises(ValueError, match=r"max_num_seqs \(16\); the largest is 8"):
        EngineConfig(scheduler=limits, compile=few)
