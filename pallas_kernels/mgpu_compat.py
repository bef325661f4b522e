"""What the Mosaic GPU kernels (gpu_gate_up.py, gpu_mosaic_attention.py) need from jax beyond
its public API: the interpreter's parameters under both supported jax versions, and a
workaround for a cost in jax's Mosaic GPU lowering."""

from __future__ import annotations

import functools

from jax.experimental.pallas import mosaic_gpu as plgpu


def interpret_params():
    """Mosaic GPU's interpreter: it runs a kernel on the CPU, simulating shared memory, TMA
    copies, barriers and warpgroups (`plgpu.InterpretGPUParams` from jax 0.11, internal in
    0.10)."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


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
