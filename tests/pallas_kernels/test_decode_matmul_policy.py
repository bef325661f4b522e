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
S = dmm.MatmulShape
ARCH = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
        "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}  # fmt: skip


def _cfg(family: str) -> ModelConfig:
    cls, kwargs = FAMILIES[family]
    return ModelConfig.from_hf_dict({"architectures": [ARCH[cls]], **kwargs})


def test_layer_shapes(monkeypatch):
    cfg = _cfg("llama3")  # 64 wide, 4 / 2 heads of 16, MLP 192 (three blocks of 64)
    heads = dmm.QkvHeads(4, 2, 16)  # qkv with the attention's epilogue, o_proj, gate/up
    want = (S(64, 128, qkv=heads), S(64, 64), S(64, 384, gate_up_block=64))
    monkeypatch.delenv("PAGEJAX_GPU_DECODE_MATMUL", raising=False)
    assert dmm.layer_shapes(cfg, jnp.bfloat16) == want  # on by default
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "xla")
    assert dmm.layer_shapes(cfg, jnp.bfloat16) is None  # the opt-out
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "pallas")
    assert dmm.layer_shapes(cfg, jnp.bfloat16) == want
    assert dmm.layer_shapes(cfg, jnp.float16) is None  # x * norm weight could overflow
    assert dmm.layer_shapes(_cfg("llama2_tied"), jnp.bfloat16) is None  # MLP 112: plain layout
    assert dmm.layer_shapes(_cfg("qwen2"), jnp.bfloat16) is None  # qkv bias
    assert dmm.layer_shapes(_cfg("qwen3"), jnp.bfloat16) is None  # q / k norms
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "yes")
    with pytest.raises(ValueError):
        dmm.layer_shapes(cfg, jnp.bfloat16)


def test_qkv_columns():
    """qkv's epilogue (RoPE, the KV cache write) takes a program's columns within one head:
    the widest of 64, 32, 16 that divides the head and leaves 96 programs, or the narrowest;
    none for a head of no multiple of 16 (its layer's RoPE stays with XLA)."""
    assert dmm.qkv_columns(dmm.QkvHeads(32, 8, 128)) == 64  # Llama-3-8B: 96 programs
    assert dmm.qkv_columns(dmm.QkvHeads(4, 2, 16)) == 16
    assert dmm.qkv_columns(dmm.QkvHeads(9, 3, 64)) == 16  # SmolLM2-135M: 60 programs
    assert dmm.qkv_columns(dmm.QkvHeads(4, 2, 8)) is None
    cls, kwargs = FAMILIES["llama3"]
    narrow = ModelConfig.from_hf_dict({"architectures": [ARCH[cls]], **kwargs, "head_dim": 8})
    assert dmm.layer_shapes(narrow, jnp.bfloat16)[0] == S(64, 64)


def test_layer_mode():
    shapes = (S(64, 128), S(64, 64), S(64, 384, gate_up_block=64))
    assert [dmm.layer_mode(INTERPRET, t, shapes) for t in (16, 32, 64)] == ["interpret"] * 3
    assert dmm.layer_mode(INTERPRET, 128, shapes) is None  # past the decode buckets
    assert dmm.layer_mode(INTERPRET, 48, shapes) is None  # Triton tiles: powers of two
    assert dmm.layer_mode(INTERPRET, 16, None) is None
    assert dmm.layer_mode(AttentionBackend.REFERENCE, 16, shapes) is None
    assert dmm.layer_mode(AttentionBackend.PALLAS, 16, shapes) is None  # no Hopper GPU here
    assert dmm.layer_mode(INTERPRET, 16, shapes, jnp.float32) == "interpret"
    bad_k = (S(100, 128), S(64, 64), S(64, 384, gate_up_block=64))
    assert dmm.layer_mode(INTERPRET, 16, bad_k) is None  # no K step divides 100
    with_rope = (S(64, 128, qkv=dmm.QkvHeads(4, 2, 16)), S(64, 64), S(64, 384, gate_up_block=64))
    assert dmm.layer_mode(INTERPRET, 16, with_rope) == "interpret"
    not_qkv = (S(64, 96, qkv=dmm.QkvHeads(4, 2, 16)), S(64, 64), S(64, 384, gate_up_block=64))
    assert dmm.layer_mode(INTERPRET, 16, not_qkv) is None  # 96 columns are not those heads


def test_layer_mode_on_a_hopper_gpu_takes_bfloat16_only(monkeypatch):
    """The GPU tiles assume Hopper's shared memory and 16-bit weights: float32 and float16
    layers, and other GPUs, stay with XLA."""
    shapes = (S(64, 128), S(64, 64), S(64, 384, gate_up_block=64))
    monkeypatch.setattr(dmm.hardware, "is_hopper", lambda: True)
    assert dmm.layer_mode(AttentionBackend.PALLAS, 16, shapes, jnp.bfloat16) == "gpu"
    assert dmm.layer_mode(AttentionBackend.PALLAS, 16, shapes, jnp.float32) is None
    assert dmm.layer_mode(AttentionBackend.PALLAS, 16, shapes, jnp.float16) is None
    monkeypatch.setattr(dmm.hardware, "is_hopper", lambda: False)
    assert dmm.layer_mode(AttentionBackend.PALLAS, 16, shapes, jnp.bfloat16) is None


def test_layer_mode_needs_a_power_of_two_of_partial_sums():
    """o_proj's residual add hands the next norm one partial sum of squares a program, which
    gate/up loads as one Triton tile: 48 wide makes three programs of 16 columns."""
    shapes = (S(48, 96), S(64, 48), S(48, 384, gate_up_block=64))
    assert dmm.layer_mode(INTERPRET, 16, shapes) is None
    # 64 wide: four programs of 16 columns, and every matmul has tiles.
    shapes = (S(64, 96), S(64, 64), S(64, 384, gate_up_block=64))
    assert dmm.layer_mode(INTERPRET, 16, shapes)


def test_config_for():
    """Measured tiles (H200): 64 columns a program where that leaves 96 programs (qkv), else
    32 (o_proj); K steps of 128 rows and up to 6 stages within 160 KiB of shared memory; the
    gate/up pair (128 columns) 64-row steps and 3 stages."""
    tiles = lambda *a: (lambda c: (c.block_n, c.block_k, c.num_stages))(dmm.config_for(*a))
    assert tiles(16, 4096, 6144) == (64, 128, 6)  # qkv
    assert tiles(16, 4096, 6144, None, dmm.QkvHeads(32, 8, 128)) == (64, 128, 6)  # + epilogue
    assert tiles(16, 64, 960, None, dmm.QkvHeads(9, 3, 64)) == (16, 64, 6)  # SmolLM2
    assert dmm.config_for(16, 4096, 4096, None, dmm.QkvHeads(32, 8, 128)) is None  # not qkv
    assert tiles(16, 4096, 4096) == (32, 128, 6)  # o_proj
    assert tiles(16, 14336, 4096) == (32, 128, 6)  # down_proj
    assert tiles(16, 4096, 28672, 64) == (128, 64, 3)  # gate/up
    assert tiles(64, 4096, 28672, 64) == (128, 64, 3)
    assert tiles(64, 4096, 4096) == (32, 128, 6)
    for m, k, n, block in ((16, 4096, 6144, None), (64, 4096, 28672, 64), (64, 14336, 4096, None)):
        cfg = dmm.config_for(m, k, n, block)
        assert cfg.num_stages * cfg.block_k * (cfg.block_n + m) * 2 <= 160 * 1024
    assert tiles(16, 192, 48) == (16, 64, 6)  # narrow: the most programs; K: 64 divides 192
    assert dmm.config_for(16, 64, 20) is None
    assert dmm.config_for(16, 4096, 200, 64) is None  # not whole gate/up pairs
