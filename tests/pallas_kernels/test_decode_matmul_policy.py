"""When a decoder layer takes the fused decode matmuls (pallas_kernels/decode_matmul.py), and
the tiles it gets."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from models.config import ModelConfig
from pallas_kernels import decode_matmul as dmm
from pallas_kernels.attention import AttentionBackend
from tests.hf_models import FAMILIES

INTERPRET = AttentionBackend.PALLAS_INTERPRET_GPU
ARCH = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
        "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}  # fmt: skip


def _cfg(family: str) -> ModelConfig:
    cls, kwargs = FAMILIES[family]
    return ModelConfig.from_hf_dict({"architectures": [ARCH[cls]], **kwargs})


def test_layer_shapes(monkeypatch):
    cfg = _cfg("llama3")  # 64 wide, 4 / 2 heads of 16, MLP 192 (three blocks of 64)
    assert dmm.layer_shapes(cfg, jnp.float32) is None  # off by default
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "pallas")
    want = ((64, 128, None), (64, 64, None), (64, 384, 64), (192, 64, None))
    assert dmm.layer_shapes(cfg, jnp.bfloat16) == want
    assert dmm.layer_shapes(cfg, jnp.float16) is None  # x * norm weight could overflow
    assert dmm.layer_shapes(_cfg("llama2_tied"), jnp.bfloat16) is None  # MLP 112: plain layout
    assert dmm.layer_shapes(_cfg("qwen2"), jnp.bfloat16) is None  # qkv bias
    assert dmm.layer_shapes(_cfg("qwen3"), jnp.bfloat16) is None  # q / k norms
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "yes")
    with pytest.raises(ValueError):
        dmm.layer_shapes(cfg, jnp.bfloat16)


def test_layer_mode():
    shapes = ((64, 128, None), (64, 64, None), (64, 384, 64), (192, 64, None))
    assert [dmm.layer_mode(INTERPRET, t, shapes) for t in (16, 32, 64)] == ["interpret"] * 3
    assert dmm.layer_mode(INTERPRET, 128, shapes) is None  # past the decode buckets
    assert dmm.layer_mode(INTERPRET, 48, shapes) is None  # Triton tiles: powers of two
    assert dmm.layer_mode(INTERPRET, 16, None) is None
    assert dmm.layer_mode(AttentionBackend.REFERENCE, 16, shapes) is None
    assert dmm.layer_mode(AttentionBackend.PALLAS, 16, shapes) is None  # no NVIDIA GPU here
    assert dmm.layer_mode(INTERPRET, 16, ((100, 64, None),)) is None  # no K step divides 100


def test_config_for_keeps_the_pipeline_in_shared_memory():
    """4 stages of the W and x slabs within 160 KiB: the gate/up pair (128 columns) takes
    smaller K steps, more so at 64 rows."""
    plain = dmm.config_for(16, 4096, 6144)
    assert (plain.block_n, plain.block_k, plain.num_stages) == (32, 256, 4)
    assert dmm.config_for(64, 14336, 4096).block_k == 128
    assert dmm.config_for(16, 4096, 28672, 64).block_k == 128
    assert dmm.config_for(64, 4096, 28672, 64).block_k == 64
    for m, k, n, block in ((16, 4096, 6144, None), (64, 4096, 28672, 64), (64, 14336, 4096, None)):
        cfg = dmm.config_for(m, k, n, block)
        cols = 2 * block if block else cfg.block_n
        assert cfg.num_stages * cfg.block_k * (cols + m) * 2 <= 160 * 1024
    assert dmm.config_for(16, 192, 48).block_n == 16
    assert dmm.config_for(16, 64, 20) is None
