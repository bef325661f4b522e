"""What the accelerator is, for the kernel choices (dispatch.py, gate_up.py), the engine's
compile options (engine/executables.py) and the persistent Mosaic GPU kernels' grids."""

from __future__ import annotations

import functools

import jax


@functools.cache
def is_nvidia() -> bool:
    """A CUDA GPU (jax's "gpu" platform also names ROCm's)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    return "rocm" not in str(getattr(device.client, "platform_version", "")).lower()


@functools.cache
def is_hopper() -> bool:
    """An NVIDIA Hopper GPU (compute capability 9.0): the Mosaic GPU kernels' target."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def num_sms() -> int:
    """SMs of the GPU: one persistent CTA each (132 on an H100 SXM or H200, also when lowering
    on a CPU)."""
    device = jax.devices()[0]
    count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(count or 132)


def load_kernel_runtimes() -> None:
    """Ready what compiled kernels need at load time, for executables loaded untraced
    (engine/executable_cache.py): on a CUDA GPU, Mosaic GPU's custom call finds its runtime
    library (its host symbols) through a variable that importing Mosaic GPU sets."""
    if is_nvidia():
        import jax.experimental.mosaic.gpu  # noqa: F401
