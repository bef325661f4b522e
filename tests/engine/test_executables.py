"""engine/executables.py: which forward buckets turn XLA's Triton GEMMs off or their split-K
on NVIDIA GPUs, that building the executables hands each its own options, and the order they
compile in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from engine import LLM, executables
from engine.step_input import StepLayout
from pallas_kernels import hardware
from tests.engine.test_engine import ENGINE_ARGS
from tests.hf_models import write_checkpoint

OFF = {"xla_gpu_enable_triton_gemm": False}
NO_SPLIT_K = {"xla_gpu_experimental_force_split_k": 1}


def _options(threshold, tokens: int):
    return executables.compiler_options(StepLayout(tokens, 8, 4), threshold)


@pytest.mark.parametrize("nvidia", [True, False])
def test_buckets_from_the_threshold_turn_triton_gemms_off_on_nvidia_gpus(nvidia, monkeypatch):
    monkeypatch.setattr(hardware, "is_nvidia", lambda: nvidia)
    options = {t: _options(32, t) for t in (16, 31, 32, 8192)}
    assert options == (
        {16: None, 31: None, 32: OFF, 8192: OFF} if nvidia else dict.fromkeys(options)
    )
    assert _options(None, 8192) is None  # PAGEJAX_GPU_GEMM=xla
    # XLA knows the options by these names (an unknown one is refused at compile time).
    lowered = jax.jit(lambda a: a @ a).lower(jnp.ones((4, 4)))
    for opts in (OFF, NO_SPLIT_K):
        assert float(lowered.compile(opts)(jnp.ones((4, 4)))[0, 0]) == 4.0


@pytest.mark.parametrize("nvidia", [True, False])
def test_buckets_of_64_to_127_tokens_turn_split_k_off(nvidia, monkeypatch):
    """XLA's Triton GEMMs keep their split-K at 16 and 32 tokens and lose it at 64-127 (the
    band measured), below the cuBLAS threshold only; a higher threshold leaves 128+ as they
    were, and with PAGEJAX_GPU_GEMM=xla (no threshold) XLA chooses everywhere."""
    monkeypatch.setattr(hardware, "is_nvidia", lambda: nvidia)
    options = {t: _options(128, t) for t in (16, 32, 63, 64, 127, 128)}
    expected = {16: None, 32: None, 63: None, 64: NO_SPLIT_K, 127: NO_SPLIT_K, 128: OFF}
    assert options == (expected if nvidia else dict.fromkeys(options))
    high = {t: _options(512, t) for t in (64, 128, 256, 512)}
    assert high == (
        {64: NO_SPLIT_K, 128: None, 256: None, 512: OFF} if nvidia else dict.fromkeys(high)
    )
    assert _options(None, 64) is None


@pytest.mark.parametrize(("threshold", "big"), [(32, OFF), (128, NO_SPLIT_K)])
def test_compile_hands_each_forward_bucket_its_options(threshold, big, tmp_path, monkeypatch):
    """With the platform check passed, the 64-token forward executable compiles with its
    bucket's option (cuBLAS from a threshold of 32, no split-K below one of 128), and the
    16-token one, the samplers and prompt logprobs without any."""
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
        str(folder),
        num_pages=32,
        compilation_cache_dir=False,
        cublas_min_tokens=threshold,
        **ENGINE_ARGS,
    )
    forward = [opts for name, opts in seen if name == "jit_forward_fn"]
    others = [opts for name, opts in seen if name != "jit_forward_fn"]
    layouts = llm.engine.runner.buckets.layouts()
    assert len(forward) == len(layouts) == 2 and others
    assert sorted(forward, key=str) == sorted(
        [big if lay.num_tokens == 64 else None for lay in layouts], key=str
    )
    assert all(opts is None for opts in others)


@pytest.mark.parametrize("nvidia", [True, False])
def test_forward_buckets_compile_slowest_first(nvidia, monkeypatch):
    """On NVIDIA GPUs the buckets whose Triton GEMMs XLA autotunes (below cublas_min_tokens)
    come first, smallest first; then, as everywhere else, the biggest steps first."""
    monkeypatch.setattr(hardware, "is_nvidia", lambda: nvidia)
    tokens = (16, 32, 64, 128, 1024, 8192)
    layouts = [StepLayout(t, 8, 4) for t in tokens]

    def order(threshold):
        key = lambda lay: executables.compile_order(lay, threshold)  # noqa: E731
        return [lay.num_tokens for lay in sorted(layouts, key=key)]

    assert order(128) == (
        [16, 32, 64, 8192, 1024, 128] if nvidia else [8192, 1024, 128, 64, 32, 16]
    )
    # PAGEJAX_GPU_GEMM=xla: XLA autotunes every bucket's GEMMs, smallest first.
    assert order(None) == (list(tokens) if nvidia else list(reversed(tokens)))
