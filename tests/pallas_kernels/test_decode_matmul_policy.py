"""When a decoder layer takes the fused decode matmuls (pallas_kernels/decode_matmul.py)."""

from __future__ import annotations

import pytest

from models.config import ModelConfig
from pallas_kernels import decode_matmul as dmm
from pallas_kernels.attention import AttentionBackend
from tests.hf_models import FAMILIES

INTERPRET = AttentionBackend.PALLAS_INTERPRET_GPU


def _cfg(family: str) -> ModelConfig:
    _, kwargs = FAMILIES[family]
    return ModelConfig.from_hf_dict({"model_type": "llama", **kwargs})


def test_layer_shapes():
    cfg = _cfg("llama3")  # 64 wide, 4 / 2 heads of 16, MLP 192 (three blocks of 64)
    assert dmm.layer_shapes(cfg) == (
        (64, 128, None),
        (64, 64, None),
        (64, 384, 64),
        (192, 64, None),
    )
    assert dmm.layer_shapes(_cfg("llama2_tied")) is None  # MLP 112: the plain gate/up layout


def test_layer_mode(monkeypatch):
    shapes = dmm.layer_shapes(_cfg("llama3"))
    assert dmm.layer_mode(INTERPRET, 16, shapes) is None  # off by default
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "pallas")
    assert dmm.layer_mode(INTERPRET, 16, shapes) == "interpret"
    assert dmm.layer_mode(INTERPRET, 64, shapes) == "interpret"
    assert dmm.layer_mode(INTERPRET, 128, shapes) is None  # past the decode buckets
    assert dmm.layer_mode(INTERPRET, 24, shapes) is None  # not whole 16-row tiles
    assert dmm.layer_mode(INTERPRET, 16, None) is None
    assert dmm.layer_mode(AttentionBackend.REFERENCE, 16, shapes) is None
    assert dmm.layer_mode(AttentionBackend.PALLAS, 16, shapes) is None  # no NVIDIA GPU here
    assert dmm.layer_mode(INTERPRET, 16, ((100, 64, None),)) is None  # no K step divides 100
    monkeypatch.setenv("PAGEJAX_GPU_DECODE_MATMUL", "yes")
    with pytest.raises(ValueError):
        dmm.layer_mode(INTERPRET, 16, shapes)


def test_config_for():
    cfg = dmm.config_for(4096, 6144)
    assert (cfg.block_k, cfg.block_n) == (256, 32)
    assert dmm.config_for(14336, 4096).block_k == 256
    assert dmm.config_for(192, 48).block_k == 64 and dmm.config_for(192, 48).block_n == 16
    assert dmm.config_for(64, 20) is None
