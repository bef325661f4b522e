"""What the accelerator is, for the kernel choices (dispatch.py, gate_up.py), the engine's
compile options (engine/runner.py) and the persistent Mosaic GPU kernels' grids."""

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


def ask_ptxas_once() -> None:
    """Make Mosaic GPU ask `ptxas` for its PTX ISA version once per process.

    jax's Mosaic GPU lowering (0.10.2 and 0.11.2) asks in every conversion to or from a type
    of 8 bits or fewer (booleans too), and each answer runs `ptxas` again: 11.7 ms on an H100
    host, 168 times while lowering the attention kernel for one bucket, ~2 s of that
    lowering's 3.3 s (docs/BENCHMARKS.md, thirteenth session). The version cannot change
    while the process runs. This replaces the extension's function, once (the kernel modules
    call this at import; later calls do nothing). It is a private name, so anything missing
    leaves it alone: no Mosaic GPU runtime here, or a jax that no longer has it
    (`test_gpu_mosaic_attention.py` checks that jax's `astype` still asks)."""
    try:
        from jax._src.lib import mosaic_gpu
    except ImportError:
        return
    ext = getattr(mosaic_gpu, "_mosaic_gpu_ext", None)
    ask = getattr(ext, "_get_ptxas_isa_version", None)
    if ask is None or getattr(ask, "asked_once", False):
        return
    once = functools.cache(ask)
    once.asked_once = True
    ext._get_ptxas_isa_version = once
