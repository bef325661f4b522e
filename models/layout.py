"""How the model keeps its parameters, against the checkpoint's (Hugging Face's) layout: q/k/v
and gate/up fused into one matmul each (`fused_parts`), gate/up's columns interleaved in blocks
(pallas_kernels/gate_up.py), q/k heads with RoPE's pairs side by side (pallas_kernels/rope.py),
and for a tensor-parallel model each fused parameter's columns grouped by shard. The loaders
(models/loader.py, models/gguf.py) arrange what they read with `arrange_param`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from pallas_kernels import gate_up
from pallas_kernels.gate_up import ArrayLike
from pallas_kernels.rope import deinterleave_rope_pairs, interleave_rope_pairs


def fused_parts(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Fused parameter name -> its checkpoint parts in order, with each part's output width."""
    n, k, h, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return {
        "qkv_proj": (("q_proj", n * h), ("k_proj", k * h), ("v_proj", k * h)),
        "gate_up_proj": (("gate_proj", f), ("up_proj", f)),
    }


def arrange_param(name: str, value: ArrayLike, cfg: ModelConfig, num_shards: int = 1) -> ArrayLike:
    """A parameter (a fused one whole, in `fused_parts` order) in the layout the model keeps,
    from the checkpoint's (HF's): gate_up_proj's gate and up columns interleaved in blocks
    (pallas_kernels/gate_up.py); qkv_proj's q and k columns (and bias), and q_norm's and
    k_norm's weights, with RoPE's pairs side by side (pallas_kernels/rope.py). Others as
    they are. `name`: the parameter's module (`gate_up_proj`, `q_norm`, ...).

    With `num_shards` > 1 (tensor parallelism), a fused parameter's columns are grouped by
    shard, each group one shard's own parameter (its q, k and v heads; its gate and up
    columns) in the layout of `cfg.shard(num_shards)`: split evenly, the columns hand each
    device what its shard of the model computes with."""
    xp = jnp if isinstance(value, jax.Array) else np
    if num_shards > 1 and name in fused_parts(cfg):
        widths = [w for _, w in fused_parts(cfg)[name]]
        parts = [xp.split(p, num_shards, axis=-1) for p in _split_columns(value, widths)]
        shard = cfg.shard(num_shards)
        return xp.concatenate(
            [
                arrange_param(name, xp.concatenate([p[s] for p in parts], axis=-1), shard)
                for s in range(num_shards)
            ],
            axis=-1,
        )
    h = cfg.head_dim
    if name == "gate_up_proj":
        return gate_up.interleave(value, gate_up.block_for(cfg.intermediate_size))
    if name == "qkv_proj":
        rotated = (cfg.num_heads + cfg.num_kv_heads) * h  # q and k; v is not rotated
        parts = [interleave_rope_pairs(value[..., :rotated], h), value[..., rotated:]]
        return xp.concatenate(parts, axis=-1)
    if name in ("q_norm", "k_norm"):
        return interleave_rope_pairs(value, h)
    return value


def unarrange_param(name: str, value: ArrayLike, cfg: ModelConfig) -> ArrayLike:
    """The inverse of `arrange_param` (one shard): back to the checkpoint's layout."""
    h = cfg.head_dim
    if name == "gate_up_proj":
        return gate_up.deinterleave(value, gate_up.block_for(cfg.intermediate_size))
    if name == "qkv_proj":
        xp = jnp if isinstance(value, jax.Array) else np
        rotated = (cfg.num_heads + cfg.num_kv_heads) * h
        parts = [deinterleave_rope_pairs(value[..., :rotated], h), value[..., rotated:]]
        return xp.concatenate(parts, axis=-1)
    if name in ("q_norm", "k_norm"):
        return deinterleave_rope_pairs(value, h)
    return value


def shard_columns(name: str, cfg: ModelConfig, num_shards: int) -> np.ndarray | None:
    """For a fused parameter: which column of its one-shard layout each column of its
    `num_shards` layout holds (a gather that turns one into the other); None for others."""
    if name not in fused_parts(cfg):
        return None
    width = sum(w for _, w in fused_parts(cfg)[name])
    hf = unarrange_param(name, np.arange(width)[None], cfg)
    return arrange_param(name, hf, cfg, num_shards)[0]


def _split_columns(value: ArrayLike, widths: list[int]) -> list[ArrayLike]:
    xp = jnp if isinstance(value, jax.Array) else np
    return xp.split(value, np.cumsum(widths)[:-1].tolist(), axis=-1)
