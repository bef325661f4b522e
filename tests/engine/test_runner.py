"""ModelRunner's XLA options per forward bucket: which buckets turn Triton GEMMs off, and that
`compile` hands each executable its own options."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from engine import LLM
from engine.config import CompileConfig, EngineConfig
from engine.runner import ModelRunner
from engine.step_input import StepLayout
from pallas_kernels import hardware
from tests.engine.test_engine import ENGINE_ARGS
from tests.hf_models import write_checkpoint

OFF = {"xla_gpu_enable_triton_gemm": False}


def _options(threshold, tokens: int):
    runner = SimpleNamespace(
        config=EngineConfig(compile=CompileConfig(cublas_min_tokens=threshold))
    )
    return ModelRunner.compiler_options(runner, StepLayout(tokens, 8, 4))


@pytest.mark.parametrize("nvidia", [True, False])
def test_buckets_from_the_threshold_turn_triton_gemms_off_on_nvidia_gpus(nvidia, monkeypatch):
    monkeypatch.setattr(hardware, "is_nvidia", lambda: nvidia)
    options = {t: _options(32, t) for t in (16, 31, 32, 8192)}
    assert options == (
        {16: None, 31: None, 32: OFF, 8192: OFF} if nvidia else dict.fromkeys(options)
    )
    assert _options(None, 8192) is None  # PAGEJAX_GPU_GEMM=xla
    # XLA knows the option by that name (an unknown one is refused at compile time).
    lowered = jax.jit(lambda a: a @ a).lower(jnp.ones((4, 4)))
    assert float(lowered.compile(OFF)(jnp.ones((4, 4)))[0, 0]) == 4.0


def test_compile_hands_each_forward_bucket_its_options(tmp_path, monkeypatch):
    """With the platform check passed, forward executables of >= 32 tokens compile with the
    option and the 16-token ones, the samplers and prompt logprobs without it."""
    folder = write_checkpoint("llama3", tmp_path / "llama3")
    monkeypatch.setattr(hardware, "is_nvidia", lambda: True)
    seen = []
    compile_ = jax.stages.Lowered.compile

    def spy(self, compiler_options=None, **kwargs):
        name = self.as_text()[:400].split("module @", 1)[1].split(" ", 1)[0]
        seen.append((name, compiler_options))
        return compile_(self, compiler_options, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    # test_engine's tiny engine: token buckets 16 and 64, one request bucket on the CPU.
    llm = LLM(
        str(folder), num_pages=32, compilation_cache_dir=False, cublas_min_tokens=32, **ENGINE_ARGS
    )
    forward = [opts for name, opts in seen if name == "jit_forward_fn"]
    others = [opts for name, opts in seen if name != "jit_forward_fn"]
    layouts = llm.engine.runner.layouts()
    assert len(forward) == len(layouts) == 2 and others
    assert sorted(forward, key=str) == sorted(
        [OFF if lay.num_tokens >= 32 else None for lay in layouts], key=str
    )
    assert all(opts is None for opts in others)
