"""`ModelConfig`: the parts of a Hugging Face `config.json` the Llama-family decoder needs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# Architectures of the Llama family and what each implies beyond config.json's own keys.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True, "o_proj_bias": False},
    "Qwen3ForCausalLM": {"qk_norm": True},
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `default`, `linear` or `llama3` (Llama 3.1's piecewise rule)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    o_proj_bias: bool = False  # o_proj does too (Llama's and Qwen3's attention_bias; not Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a `config.json` dict (transformers 4.x and 5.x key styles)."""
        architectures = d.get("architectures") or ["LlamaForCausalLM"]
        arch = architectures[0]
        family = _FAMILY_DEFAULTS.get(arch, {})
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        # transformers 5 moved rope_theta/rope_scaling into `rope_parameters`.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"unsupported rope scaling type {rope_type!r} (default, linear, llama3)"
            )
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", 8192)
            ),
        )
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        use_sw = d.get("use_sliding_window", True)
        sliding_window = d.get("sliding_window") if use_sw else None
        attention_bias = bool(d.get("attention_bias", family.get("attention_bias", False)))
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=family.get("o_proj_bias", attention_bias),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=family.get("qk_norm", False),
            sliding_window=sliding_window,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def shard(self, num_shards: int) -> ModelConfig:
        """The config of one of `num_shards` tensor-parallel shards: 1/n of the q heads, the
        KV heads and the MLP width; head_dim, the hidden size and the vocabulary whole."""
        if num_shards == 1:
            return self
        if num_shards < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {num_shards}")
        sizes = (
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
        )
        bad = [f"{name} ({size})" for name, size in sizes if size % num_shards]
        if bad:
            raise ValueError(
                f"tensor_parallel_size {num_shards} must divide the model's " + ", ".join(bad)
            )
        return dataclasses.replace(
            self,
            num_heads=self.num_heads // num_shards,
            num_kv_heads=self.num_kv_heads // num_shards,
            intermediate_size=self.intermediate_size // num_shards,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the model folder")
        return cls.from_hf_dict(json.loads(path.read_text()))
