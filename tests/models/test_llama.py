"""Each Llama-family variant, loaded from a tiny random checkpoint written by transformers,
against transformers itself (torch, float32, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.loader import load_model
from tests.hf_models import (
    FAMILIES,
    empty_caches,
    hf_greedy,
    hf_logits,
    single_request_metadata,
    write_checkpoint,
)

PAGE_SIZE = 8
# Non-contiguous, permuted pages (page 0 is the padding page and never used).
PAGE_IDS = [5, 2, 9, 1, 7, 3, 11, 4, 8, 6, 10, 12]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    return family, write_checkpoint(family, tmp_path_factory.mktemp(family))


@nnx.jit
def _forward(model, token_ids, positions, kv_caches, meta):
    hidden, kv_caches = model(token_ids, positions, kv_caches, meta)
    return model.logits(hidden), kv_caches


def _run(model, caches, token_ids: list[int], start: int):
    meta = single_request_metadata(start, len(token_ids), PAGE_IDS, PAGE_SIZE)
    positions = jnp.arange(start, start + len(token_ids), dtype=jnp.int32)
    return _forward(model, jnp.asarray(token_ids, jnp.int32), positions, caches, meta)


def test_logits_match_transformers(checkpoint):
    family, folder = checkpoint
    model = load_model(folder, dtype="float32")
    token_ids = np.random.default_rng(1).integers(3, 320, size=40).tolist()
    logits, _ = _run(model, empty_caches(model, 13, PAGE_SIZE), token_ids, 0)
    ref = hf_logits(folder, token_ids)
    logits = np.asarray(logits)
    assert logits.shape == ref.shape
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, f"{family}: max relative error {rel:.2e}"


def test_greedy_continuation_matches_transformers(checkpoint):
    """Prefill in two chunks, then 32 decode steps through the paged cache."""
    family, folder = checkpoint
    model = load_model(folder, dtype="float32")
    prompt = np.random.default_rng(2).integers(3, 320, size=19).tolist()
    caches = empty_caches(model, 13, PAGE_SIZE)
    _, caches = _run(model, caches, prompt[:11], 0)
    logits, caches = _run(model, caches, prompt[11:], 11)
    generated = [int(jnp.argmax(logits[-1]))]
    for _ in range(31):
        logits, caches = _run(model, caches, generated[-1:], len(prompt) + len(generated) - 1)
        generated.append(int(jnp.argmax(logits[-1])))
    assert generated == hf_greedy(folder, prompt, 32), family


@pytest.mark.parametrize(
    "name, hf_config, expected",
    [
        (
            "llama-3-8b",
            dict(
                architectures=["LlamaForCausalLM"],
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                rope_theta=500000.0,
                tie_word_embeddings=False,
            ),
            8_030_261_248,
        ),
        (
            "qwen3-8b",
            dict(
                architectures=["Qwen3ForCausalLM"],
                vocab_size=151936,
                hidden_size=4096,
                intermediate_size=12288,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                tie_word_embeddings=False,
            ),
            8_190_735_360,
        ),
    ],
)
def test_full_size_parameter_count_without_allocating(name, hf_config, expected):
    from models.config import ModelConfig
    from models.loader import abstract_model

    model = abstract_model(ModelConfig.from_hf_dict(hf_config), jnp.bfloat16, "reference")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == expected, name


def test_fused_layers_at_8b_widths_match_xla_layers(monkeypatch):
    """The fused decode layers, interpreted, at Llama-3-8B's widths and tiles (128 partial sums
    of squares from o_proj, 64-column qkv programs), bf16, against the same model's layers
    left to XLA: 64-, 32- and 16-token steps (tests/hf_models.py)."""
    from pallas_kernels.attention import AttentionBackend
    from tests.hf_models import fused_against_xla_layers

    monkeypatch.delenv("PAGEJAX_GPU_DECODE_MATMUL", raising=False)
    fused, ref = fused_against_xla_layers(4096, 14336, AttentionBackend.PALLAS_INTERPRET_GPU)
    rel = np.abs(fused - ref).max() / np.abs(ref).max()
    assert rel <= 3e-2, f"max relative error {rel:.2e}"
    assert (fused.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("head_dim", [8, 16])
def test_fused_decode_matmuls_match_transformers(tmp_path, monkeypatch, head_dim):
    """`PAGEJAX_GPU_DECODE_MATMUL=pallas`, the GPU kernels interpreted: a 32-token step and a
    16-token step, each layer's qkv, o_proj and gate/up as the fused matmuls
    (pallas_kernels/decode_matmul.py), against transformers' logits. Heads of 16 take RoPE and
    the cache write into qkv's epilogue; heads of 8 leave them to XLA."""
    from pallas_kernels import decode_matmul

    folder = write_checkpoint("llama3", tmp_path, head_dim=head_dim)
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "pallas")  # read when the model is built
    rows, epilogues, matmul = [], [], decode_matmul.matmul

    def spy(x, *a, **k):
        rows.append(x.shape[0])
        epilogues.append(k.get("qkv") is not None)
        return matmul(x, *a, **k)

    monkeypatch.setattr(decode_matmul, "matmul", spy)
    model = load_model(folder, dtype="float32", attention_backend="pallas-interpret-gpu")
    token_ids = np.random.default_rng(2).integers(3, 320, size=48).tolist()
    caches = empty_caches(model, 13, PAGE_SIZE)
    first, caches = _run(model, caches, token_ids[:32], 0)
    second, _ = _run(model, caches, token_ids[32:], 32)
    logits = np.concatenate([np.asarray(first), np.asarray(second)])
    ref = hf_logits(folder, token_ids)
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"
    assert sorted(set(rows)) == [16, 32]  # both steps took the fused path
    assert any(epilogues) == (head_dim == 16)
