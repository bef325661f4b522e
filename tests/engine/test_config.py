"""Bucket ladders (the step shapes compiled at start-up) and the XLA options of each."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from engine.config import (
    CUBLAS_MIN_TOKENS,
    CompileConfig,
    EngineConfig,
    bucket_ladder,
    parse_gpu_gemm,
)
from engine.runner import ModelRunner
from engine.step_input import StepLayout


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


def test_gpu_gemm_setting_parses_to_a_token_threshold(monkeypatch):
    assert parse_gpu_gemm("auto") == CUBLAS_MIN_TOKENS
    assert parse_gpu_gemm("xla") is None
    assert parse_gpu_gemm("128") == 128
    with pytest.raises(ValueError, match="PAGEJAX_GPU_GEMM"):
        parse_gpu_gemm("cublas")
    monkeypatch.setenv("PAGEJAX_GPU_GEMM", "xla")
    assert CompileConfig().cublas_min_tokens is None
    monkeypatch.delenv("PAGEJAX_GPU_GEMM")
    assert CompileConfig().cublas_min_tokens == CUBLAS_MIN_TOKENS


@pytest.mark.parametrize("backend", ["gpu", "cpu", "tpu"])
def test_forward_buckets_from_the_threshold_turn_triton_gemms_off_on_gpus(backend, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    runner = SimpleNamespace(config=EngineConfig(compile=CompileConfig(cublas_min_tokens=32)))
    options = {
        t: ModelRunner.compiler_options(runner, StepLayout(t, 8, 4)) for t in (16, 31, 32, 8192)
    }
    off = {"xla_gpu_enable_triton_gemm": False}
    if backend == "gpu":
        assert options == {16: None, 31: None, 32: off, 8192: off}
    else:
        assert set(options.values()) == {None}
    runner = SimpleNamespace(config=EngineConfig(compile=CompileConfig(cublas_min_tokens=None)))
    assert ModelRunner.compiler_options(runner, StepLayout(8192, 8, 4)) is None
    # XLA knows the option by that name (an unknown one is refused at compile time).
    monkeypatch.undo()
    lowered = jax.jit(lambda a: a @ a).lower(jnp.ones((4, 4)))
    assert float(lowered.compile(off)(jnp.ones((4, 4)))[0, 0]) == 4.0
