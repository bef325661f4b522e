"""The MLP's gate/up matmul with its activation fused: silu(x @ W_gate) * (x @ W_up) in one
Mosaic GPU kernel for Hopper (TMA, wgmma, warp specialisation), so the [T, 2F] product never
goes to HBM and back for the elementwise step (that pass took ~0.23 ms a layer of an
8,192-token Llama-3-8B step on an H100, ~3.8 % of the step). Measured (docs/BENCHMARKS.md,
ninth session): 2,446 against 2,525-2,621 us for XLA's matmul and activation at 8,192 rows on
an H200, 305 against 323 at 1,024; the engine takes it from `gate_up.GPU_KERNEL_MIN_TOKENS`
rows, since at 512 rows it lost by 1 %.

The fused weight is stored interleaved (gate_up.py): blocks of `BLOCK` gate columns and
`BLOCK` up columns alternate, so a warpgroup's `2 * BLOCK`-column tile holds the gate and up
columns of the same `BLOCK` features and its epilogue writes `BLOCK` output columns.
`gate_up.silu_gate_up_reference` is the same computation in jnp.

The main loop is the one of jax's `pallas.ops.gpu.hopper_matmul_mgpu`: a persistent grid (one
CTA per SM) walks the output tiles in a planar snake; a memory warpgroup streams `tile_k` slabs
of x and W through a ring of shared-memory slots, two compute warpgroups each multiply the CTA's
x tile by half of its W tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gate_up import BLOCK
from pallas_kernels.hardware import num_sms
from pallas_kernels.mgpu_compat import ask_ptxas_once, interpret_params

ask_ptxas_once()  # before any of this module's kernels lowers


@dataclasses.dataclass(frozen=True)
class GateUpConfig:
    """Tiles. The field defaults are a base for tests and sweeps; the engine's tiles come from
    `default_config(K)`."""

    tile_m: int = 128  # rows of x a CTA takes (both warpgroups)
    tile_k: int = 64
    max_concurrent_steps: int = 4
    grid_tile_width: int = 16  # planar snake: tiles along M before moving along N
    num_ctas: int | None = None


def default_config(k: int) -> GateUpConfig:
    """The tiles for K = `k`: K slabs of 128 in a ring of 2 where they divide K, else slabs of
    64 in a ring of 3. H200, Llama-3-8B's MLP (eighteenth session, docs/BENCHMARKS.md), us at
    8,192 / 1,024 rows: 2,380 / 305 and 2,433 / 304 against 2,577 / 306 for the earlier
    default (slabs of 64 in a ring of 4). 128-row slabs in a ring of 2 take 192 KiB of shared
    memory, and the epilogue's buffers 32 KiB more."""
    if k % 128 == 0:
        return GateUpConfig(tile_k=128, max_concurrent_steps=2)
    return GateUpConfig(tile_k=64, max_concurrent_steps=3)


def supports(m: int, k: int, two_f: int, dtype, w_dtype, cfg: GateUpConfig | None = None) -> bool:
    """Whether the kernel takes x [m, k] @ w [k, two_f]: 16-bit floats, whole tiles (M in rows
    of `tile_m`, K in slabs of `tile_k`, 2F in CTA tiles of two gate/up block pairs)."""
    cfg = cfg or default_config(k)
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and jnp.dtype(w_dtype) == jnp.dtype(dtype)
        and cfg.tile_m % 64 == 0  # whole epilogue tiles of 64 rows
        and m % cfg.tile_m == 0
        and k % cfg.tile_k == 0
        and two_f % (4 * BLOCK) == 0
    )


def silu_gate_up(
    x: jax.Array, w: jax.Array, *, config: GateUpConfig | None = None, interpret: bool = False
) -> jax.Array:
    """x [M, K] @ interleaved w [K, 2F] -> silu(gate) * up [M, F], in x's dtype, on
    `config` (default: `default_config(K)`).
    interpret: run in Mosaic GPU's interpreter (`interpret_params`; tests on the CPU)."""
    (m, k), (_, two_f) = x.shape, w.shape
    cfg = config or default_config(k)
    if not supports(m, k, two_f, x.dtype, w.dtype, cfg):
        raise NotImplementedError(f"silu_gate_up: x {x.shape} {x.dtype}, w {w.shape}")
    dtype = x.dtype
    tile_m, tile_k, block = cfg.tile_m, cfg.tile_k, BLOCK
    wg_n = 2 * block  # W columns a warpgroup multiplies: one gate and one up block
    cta_n = 2 * wg_n
    m_iters, n_iters, k_iters = m // tile_m, two_f // cta_n, k // tile_k
    swizzle = plgpu.find_swizzle(tile_k * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(block * jnp.dtype(dtype).itemsize * 8)
    out_transforms = (
        plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(out_swizzle),
    )
    epi_m = 64
    num_ctas = cfg.num_ctas or num_sms()

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (tile_m, tile_k),
                    lambda kk: (0, kk),
                    transforms=transforms,
                    memory_space=plgpu.SMEM,
                ),
                plgpu.BlockSpec(
                    (tile_k, cta_n),
                    lambda kk: (kk, 0),
                    transforms=transforms,
                    memory_space=plgpu.SMEM,
                ),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=compute_context,
        )

    def gate_up_matmul(x_gmem, w_gmem, out_gmem):  # its name shows in profiler traces
        ignore = lambda *_, **__: None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
            out_smem=plgpu.SMEM((2, 2, epi_m, block), dtype, transforms=out_transforms),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cta")
            def _tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 0, cfg.grid_tile_width)
                rows = pl.ds(mi * tile_m, tile_m)
                feature0 = (ni * 2 + wg) * block

                def compute_context(run):
                    @functools.partial(
                        pl.run_scoped, acc_ref=plgpu.ACC((tile_m, wg_n), jnp.float32)
                    )
                    def _acc(acc_ref):
                        run(acc_ref)
                        acc = acc_ref[...]
                        gate, up = acc[:, :block], acc[:, block:]
                        h = (gate / (1.0 + jnp.exp(-gate)) * up).astype(dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for e in range(tile_m // epi_m):
                            slot = e % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            out_smem[wg, slot] = h[e * epi_m : (e + 1) * epi_m]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                out_gmem.at[rows]
                                .at[pl.ds(e * epi_m, epi_m)]
                                .at[:, pl.ds(feature0, block)],
                            )

                def mma(_, x_smem, w_smem, acc_ref):
                    plgpu.wgmma(acc_ref, x_smem, w_smem.at[:, pl.ds(wg * wg_n, wg_n)])
                    plgpu.wgmma_wait(0)
                    return acc_ref

                pipeline(mma, compute_context)(
                    x_gmem.at[rows, :],
                    w_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
                    allocations=allocs,
                )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return plgpu.kernel(
        gate_up_matmul,
        out_type=jax.ShapeDtypeStruct((m, two_f // 2), dtype),
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
        interpret=interpret_params() if interpret else None,
    )(x, w)
