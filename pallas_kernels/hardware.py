"""What the accelerator is, for the kernel choices (dispatch.py, gate_up.py)."""

from __future__ import annotations

import functools

import jax


@functools.cache
def is_hopper() -> bool:
    """An NVIDIA Hopper GPU (compute capability 9.0): the Mosaic GPU kernels' target."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"
