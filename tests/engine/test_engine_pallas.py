"""The whole engine with the Pallas kernels (run by Pallas' interpreters on the CPU) against the
engine with the jnp attention: same greedy tokens, mixed prefill chunks and decodes included."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, SamplingParams
from tests.hf_models import write_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"))


def _generate(folder, backend: str, prompts, cache_dir) -> list[list[int]]:
    llm = LLM(
        str(folder),
        attention_backend=backend,
        skip_tokenizer_init=True,
        page_size=8,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=128,
        num_pages=40,
        token_buckets=(32,),
        dtype="float32",
        compilation_cache_dir=cache_dir,
    )
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    return [
        o.outputs[0].token_ids
        for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    ]


@pytest.mark.parametrize("backend", ["pallas-interpret-gpu", "pallas-interpret-tpu"])
def test_pallas_backend_matches_reference(folder, tmp_path, backend):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (3, 20, 45)]
    want = _generate(folder, "reference", prompts, str(tmp_path))
    assert _generate(folder, backend, prompts, str(tmp_path)) == want


@pytest.fixture(scope="module", params=[8, 16], ids=["head8", "head16"])
def llama_case(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp(f"llama3_{request.param}")
    return write_checkpoint("llama3", folder, head_dim=request.param), request.param


def test_fused_decode_matmuls_match_reference(llama_case, tmp_path, monkeypatch):
    """`PAGEJAX_GPU_DECODE_MATMUL=pallas` (the default, set here so that the test does not
    depend on the environment): every 32-token step (prompt chunks and decodes) runs its
    layers' qkv, o_proj and gate/up as the fused Triton matmuls (pallas_kernels/
    decode_matmul.py), interpreted; with heads of 16, qkv also applies RoPE and writes the
    step's keys and values into the cache (and drops the padding tokens' rows); heads of 8
    leave those to XLA."""
    llama_folder, head_dim = llama_case
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (4, 30, 41)]
    want = _generate(llama_folder, "reference", prompts, str(tmp_path))
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "pallas")
    calls = []
    from pallas_kernels import decode_matmul

    matmul = decode_matmul.matmul
    monkeypatch.setattr(decode_matmul, "matmul", lambda *a, **k: calls.append(k) or matmul(*a, **k))
    assert _generate(llama_folder, "pallas-interpret-gpu", prompts, str(tmp_path)) == want
    assert calls and all(k["mode"] == "interpret" for k in calls)  # the fused path ran
    assert any(k.get("qkv") is not None for k in calls) == (head_dim == 16)
