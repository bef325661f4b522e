"""Meshes, and the rules that map the model's logical axes onto them (DESIGN.md, "Parallelism").

Parameters and the KV cache name their axes logically (`models.llama.LlamaForCausalLM.
param_axes`, `pallas_kernels.reference.KV_CACHE_AXES`): "heads" (a layer's q/k/v heads, and
o_proj's input), "kv_heads" (the KV cache's), "mlp" (the MLP's hidden width), "vocab" (the LM
head's outputs), "embed" and unnamed axes. `RULES` puts the first four on the mesh's `model`
axis and replicates the rest: Megatron-style tensor parallelism, where each device holds 1/n of
every layer's heads and MLP width and a step reduces o_proj's and down_proj's outputs across
the axis. The `data` axis is in the mesh (size 1) for data parallelism to come.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
RULES: dict[str, str] = {"heads": MODEL, "kv_heads": MODEL, "mlp": MODEL, "vocab": MODEL}


def make_mesh(model_size: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data 1, model `model_size`) mesh on the first `model_size` devices (or `devices`).
    Built from the device list directly (not `jax.make_mesh`), so its axes are in auto
    sharding mode on every supported jax."""
    devices = list(jax.devices() if devices is None else devices)
    if model_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {model_size}")
    if model_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size {model_size} needs {model_size} devices, "
            f"this process sees {len(devices)} ({devices[0].platform})"
        )
    return Mesh(np.array(devices[:model_size]).reshape(1, model_size), (DATA, MODEL))


def partition_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """Logical axis names (one per array axis) -> the mesh axes they are split over."""
    return PartitionSpec(*(RULES.get(a) if a else None for a in axes))


def named_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
