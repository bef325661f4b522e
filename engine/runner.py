"""The model runner: the one place device state lives (weights, KV cache, per-request rows).

Each step calls ahead-of-time compiled executables (step_fns.py) chosen by bucket: the forward
pass `kv_caches, rows, logits, hidden = forward(params, kv_caches, rows, model_buffer)`, then a
sampler variant picked on the host, with the KV cache and row state donated (updated in place)
and the weights passed as arguments. Every bucket is compiled at start-up; calling a compiled
executable never traces or compiles again. `dispatch` returns at once and `collect` waits, so
the engine schedules step N + 1 while step N runs.

A tensor-parallel model (`num_shards` > 1, loaded split over a mesh's `model` axis) runs its
forward pass and prompt logprobs per shard under `shard_map`, with the KV cache split by KV
heads; the row state, the step's inputs, the logits and the sampler are whole on every device.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec
from tqdm import tqdm

import sharding
from engine import buckets, executables, watchdog
from engine.config import EngineConfig
from engine.executable_cache import ExecutableCache
from engine.executables import CompileJob
from engine.row_state import RowState, set_row_fn
from engine.step_fns import (
    FULL,
    GREEDY,
    SAMPLE,
    SampleResult,
    SampleVariant,
    forward_fn,
    pick_variant,
    prompt_logprobs_fn,
    sample_fn,
)
from engine.step_input import BufferPool, StepLayout, build_step_input
from engine.types import SchedulerOutput, StepOutput, TokenLogprobs
from pallas_kernels import hardware
from pallas_kernels.attention import AttentionBackend
from pallas_kernels.reference import KV_CACHE_AXES, kv_cache_shape

logger = logging.getLogger(__name__)

MAX_LOGIT_BIAS = 1024  # entries of logit_bias one request may set
MAX_STOP_IDS = 64  # EOS + stop_token_ids banned until min_tokens


class Dispatched(NamedTuple):
    """A step in flight: its device outputs."""

    sampled: SampleResult
    prompt: tuple | None  # prompt logprob stats ([T], [T], [T, K], [T, K]) when asked for


class Launched(NamedTuple):
    """A step handed to the launcher thread (`ModelRunner._launcher`): its `Dispatched`, once
    the device has it."""

    future: concurrent.futures.Future


class ModelRunner:
    """Owns device state; turns a `SchedulerOutput` into a `StepOutput`."""

    def __init__(self, model, config: EngineConfig, *, num_pages: int):
        cfg = model.config
        self.config = config
        self.model_config = cfg
        self.page_size = config.cache.page_size
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.pages_per_request = -(-config.scheduler.max_model_len // self.page_size)
        self.eos_token_ids: tuple[int, ...] = ()  # the engine's, set once its tokenizer loads
        self.graphdef, state = nnx.split(model)
        self.params, treedef = jax.tree.flatten(state)
        self.model_def = (self.graphdef, treedef)
        dtype = model.model.embed_tokens.embedding[...].dtype
        self._backend = model.model.layers[0].self_attn.backend
        self.num_shards = model.num_shards
        # The mesh the loader split the weights over.
        self.mesh = self.params[0].sharding.mesh if self.num_shards > 1 else None
        # Where the row state and each step's inputs live: every device of the mesh.
        self._whole = sharding.replicated(self.mesh) if self.mesh else None
        kv_where = self.mesh and sharding.named_sharding(self.mesh, KV_CACHE_AXES)
        shape = kv_cache_shape(num_pages, self.page_size, cfg.num_kv_heads, cfg.head_dim)
        # Allocated by `compile`, after XLA's autotuning has had the memory to itself.
        self._kv_specs = [jax.ShapeDtypeStruct(shape, dtype, sharding=kv_where)] * cfg.num_layers
        self.kv_caches: list[jax.Array] = []
        self.rows_state = jax.device_put(
            RowState.zeros(self.max_num_seqs + 1, cfg.vocab_size), self._whole
        )
        # On a mesh, calling an executable returns only once the host has launched its
        # kernels on every device: the step's all-reduces split it into dozens of pieces, each
        # launched apart (2.1-2.5 ms a step for an 8B model on two H200s, docs/BENCHMARKS.md,
        # twenty-third session). One thread makes every call that reads or writes the device
        # state, in the order they are made, while this one goes on to prepare the next step.
        self._launcher = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="launcher")
            if self.mesh is not None
            else None
        )
        self._row_writes: list[concurrent.futures.Future] = []  # handed over since a step
        # A device of an accelerator mesh that fails leaves the host waiting on the others
        # for ever: end the process instead (`engine.watchdog`).
        platform = self.mesh.devices.flat[0].platform if self.mesh is not None else None
        self.watchdog = watchdog.for_mesh(platform, config.load.mesh_timeout_s)
        self.scratch_row = self.max_num_seqs
        self._free_rows = list(range(self.max_num_seqs - 1, -1, -1))
        self._rows: dict[str, int] = {}
        self._seeds: dict[str, int] = {}
        self._dirty_rows: set[int] = set()  # rows whose bias/stop mask is not all-zero
        self._rng = np.random.default_rng(config.load.seed)
        self.buckets = buckets.Buckets(
            config,
            platform=jax.default_backend(),
            pages_per_request=self.pages_per_request,
            kernel_twins=buckets.wants_kernel_twins(model, dtype, self.page_size),
        )
        self._forward: dict[StepLayout, object] = {}
        self._sampler: dict[tuple[int, SampleVariant], object] = {}
        self._prompt_lp: dict[int, object] = {}
        self._row_writer: dict[None, object] = {}  # its one executable, under the key None
        self._set_row = None
        self.num_loaded = 0  # executables `compile` found in the `ExecutableCache`
        self._buffers = BufferPool()

    def compile(self) -> None:
        """Build every bucket ahead of time (`executables.build`): the forward pass per (T, R)
        bucket, each sampler variant per R bucket, prompt logprobs per T bucket, the row
        writer, through the executable cache when there is a folder for it. Then allocate
        the KV cache, after XLA's autotuning has had the memory to itself."""
        folder = self.config.compile.compilation_cache_dir
        # Pallas' interpreters run kernels as Python callbacks, which a stored executable
        # cannot keep (jax's own persistent cache skips such executables too; jaxlib 0.10.2
        # crashes serializing one that spans several CPU devices).
        interpreted = self._backend in (
            AttentionBackend.PALLAS_INTERPRET_GPU,
            AttentionBackend.PALLAS_INTERPRET_TPU,
        )
        cache = ExecutableCache.under(folder) if folder and not interpreted else None
        model = ExecutableCache.key(self.model_def, self.model_config) if cache else None
        if cache:
            hardware.load_kernel_runtimes()
        if self.mesh is not None:
            devices = list(self.mesh.devices.flat)
        else:
            devices = list({d for a in self.params for d in a.devices()})
            assert len(devices) == 1, "a model on several devices is loaded with its mesh"
        jobs = list(self._jobs())
        self.num_loaded = executables.build(jobs, cache=cache, model_key=model, devices=devices)
        self._set_row = self._row_writer[None]
        self.kv_caches = [jnp.zeros(k.shape, k.dtype, device=k.sharding) for k in self._kv_specs]

    def _jobs(self) -> Iterator[CompileJob]:
        """One `CompileJob` per executable, on abstract arguments (nothing traced yet)."""
        params, rows = executables.abstract(self.params), executables.abstract(self.rows_state)
        kv = self._kv_specs
        # The model definition is bound, not an argument: the executable cache keys on it once.
        forward = jax.jit(
            self._per_shard(functools.partial(forward_fn, self.model_def), forward=True),
            static_argnames=("layout",),
            donate_argnames=("kv_caches", "rows_state"),
        )
        sampler = jax.jit(
            sample_fn, static_argnames=("layout", "variant"), donate_argnames=("rows_state",)
        )
        prompt_lp = jax.jit(
            self._per_shard(functools.partial(prompt_logprobs_fn, self.model_def), forward=False)
        )
        i32 = functools.partial(executables.whole, jnp.int32, self._whole)
        layouts = self.buckets.layouts()
        cublas_min_tokens = self.config.compile.cublas_min_tokens
        d, v = self.model_config.hidden_size, self.model_config.vocab_size
        dtype = self._kv_specs[0].dtype

        def forward_job(layout: StepLayout) -> CompileJob:
            args = (params, kv, rows, i32(layout.size))
            options = executables.compiler_options(layout, cublas_min_tokens)
            return CompileJob(self._forward, layout, forward, args, {"layout": layout}, options)

        # The slowest compiles first, so that none of them is the tail (the compile pool runs
        # them as this thread lowers the next ones).
        layouts = sorted(layouts, key=lambda lay: executables.compile_order(lay, cublas_min_tokens))
        yield from (forward_job(lay) for lay in layouts if lay.attention != "mgpu")
        for r in sorted({lay.num_requests for lay in layouts}):
            lay = StepLayout(0, r, self.pages_per_request)
            args = (rows, executables.whole(jnp.float32, self._whole, r, v), i32(lay.sample_size))
            for variant in (GREEDY, SAMPLE, FULL):
                static = {"layout": lay, "variant": variant}
                yield CompileJob(self._sampler, (r, variant), sampler, args, static)
        for t in sorted({lay.num_tokens for lay in layouts}, reverse=True):
            args = (params, executables.whole(dtype, self._whole, t, d), i32(t))
            yield CompileJob(self._prompt_lp, t, prompt_lp, args, {})
        set_row = jax.jit(set_row_fn, donate_argnames=("rows_state",))
        args = (
            rows,
            i32(),
            i32(MAX_LOGIT_BIAS),
            executables.whole(jnp.float32, self._whole, MAX_LOGIT_BIAS),
            i32(MAX_STOP_IDS),
        )
        yield CompileJob(self._row_writer, None, set_row, args, {})
        # Last: lowering the Mosaic GPU kernel takes 1.5-2.9 s a bucket of this thread in a
        # cold start (H100), which would hold back every compile after it; these compile in a
        # few seconds.
        yield from (forward_job(lay) for lay in layouts if lay.attention == "mgpu")

    def _per_shard(self, fn, *, forward: bool):
        """`fn` (the forward pass, else prompt logprobs) as is, or for a tensor-parallel model,
        run per shard (`shard_map`): the parameters and the KV cache split as they are placed,
        the rest whole on every shard, and so are the outputs (o_proj's and down_proj's sums,
        the gathered logits). `check_vma` is off: the Pallas kernels' outputs carry no
        varying-axes types."""
        if self.mesh is None:
            return fn
        params = [a.sharding.spec for a in self.params]
        kv = [k.sharding.spec for k in self._kv_specs]
        whole = PartitionSpec()
        if forward:
            in_specs, out_specs = (params, kv, whole, whole), (kv, whole, whole, whole)
        else:
            in_specs, out_specs = (params, whole, whole), whole

        @functools.wraps(fn)  # its signature: jit donates and keeps static by name
        def per_shard(*args, **static):
            body = functools.partial(fn, **static)
            return jax.shard_map(
                body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
            )(*args)

        per_shard.__name__ = fn.func.__name__
        return per_shard

    def warm_up(self) -> None:
        """Run every executable once on an all-padding batch. The first run of an executable
        on a GPU loads its kernels and sets up library handles (hundreds of ms): without this,
        the first requests to reach each bucket pay it (seen as a 420 ms p99 TTFT at 4 req/s)."""
        empty = SchedulerOutput(requests=(), num_batched_tokens=0)
        for layout, forward in tqdm(self._forward.items(), desc="warming up", leave=False):
            bufs = build_step_input(
                empty,
                layout,
                page_size=self.page_size,
                rows=[],
                seeds=[],
                scratch_row=self.scratch_row,
            )
            with self._guard(f"the warm-up of {layout}"):
                self.kv_caches, self.rows_state, logits, hidden = forward(
                    self.params, self.kv_caches, self.rows_state, bufs.model
                )
                for variant in (GREEDY, SAMPLE, FULL):
                    sampler = self._sampler[layout.num_requests, variant]
                    self.rows_state, _ = sampler(self.rows_state, logits, bufs.sample)
                self._prompt_lp[layout.num_tokens](self.params, hidden, bufs.next_token_ids)
        with self._guard("the warm-up"):
            jax.block_until_ready(self.kv_caches)

    def _guard(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Ends the process if the calls inside do not return in time, on an accelerator mesh
        (`engine.watchdog`); elsewhere nothing."""
        return contextlib.nullcontext() if self.watchdog is None else self.watchdog.guard(what)

    # -- per-request rows -------------------------------------------------------------------
    def _release(self, request_ids) -> None:
        for rid in request_ids:
            row = self._rows.pop(rid, None)
            if row is not None:
                self._free_rows.append(row)
            self._seeds.pop(rid, None)

    def _row_for(self, req) -> int:
        row = self._rows.get(req.request_id)
        if row is not None:
            return row
        row = self._free_rows.pop()
        self._rows[req.request_id] = row
        sp = req.sampling_params
        self._seeds[req.request_id] = (
            sp.seed if sp.seed is not None else int(self._rng.integers(0, 2**32))
        )
        stop_ids = (
            []
            if sp.min_tokens == 0
            else list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(self.eos_token_ids))
        )
        penalties = sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1
        # A row must start clean for a request that reads it (penalties read the counts; bias
        # and stop mask are read by every request of a FULL-variant batch).
        if sp.logit_bias or stop_ids or penalties or row in self._dirty_rows:
            self._write_row(row, sp.logit_bias or {}, stop_ids)
        return row

    def _write_row(self, row: int, bias: dict[int, float], stop_ids: list[int]) -> None:
        assert len(bias) <= MAX_LOGIT_BIAS and len(stop_ids) <= MAX_STOP_IDS
        ids = np.full(MAX_LOGIT_BIAS, -1, np.int32)
        vals = np.zeros(MAX_LOGIT_BIAS, np.float32)
        ids[: len(bias)] = list(bias.keys())
        vals[: len(bias)] = list(bias.values())
        stops = np.full(MAX_STOP_IDS, -1, np.int32)
        stops[: len(stop_ids)] = stop_ids

        def write() -> None:
            self.rows_state = self._set_row(self.rows_state, np.int32(row), ids, vals, stops)

        if self._launcher is None:
            write()
        else:  # after the steps already handed over; the next step's launch re-raises errors
            self._row_writes.append(self._launcher.submit(write))
        if bias or stop_ids:
            self._dirty_rows.add(row)
        else:
            self._dirty_rows.discard(row)

    # -- the step ---------------------------------------------------------------------------
    def dispatch(self, sched: SchedulerOutput) -> Dispatched | Launched | None:
        """Start the step on the device and return at once (None for an empty step). Collect
        each step before dispatching the one after the next: its input buffers are refilled
        then (`BufferPool`; on the CPU, jax reads them in place). On a mesh the executables
        are called by the launcher thread (`Launched`)."""
        self._release(sched.finished_request_ids | sched.preempted_request_ids)
        if sched.is_empty:
            return None
        for req in sched.requests:
            if req.start_position == 0:  # (re)admitted: its row state starts afresh
                self._release([req.request_id])
        rows = [self._row_for(req) for req in sched.requests]
        seeds = [self._seeds[req.request_id] for req in sched.requests]
        layout = self.buckets.layout_for(sched)
        bufs = build_step_input(
            sched,
            layout,
            page_size=self.page_size,
            rows=rows,
            seeds=seeds,
            scratch_row=self.scratch_row,
            buffers=self._buffers.get(layout),
        )
        # One transfer (to every device of a mesh).
        model_buf, sample_buf = jax.device_put([bufs.model, bufs.sample], self._whole)
        variant = pick_variant([req.sampling_params for req in sched.requests])
        prompt_lp = any(req.sampling_params.prompt_logprobs is not None for req in sched.requests)
        writes, self._row_writes = self._row_writes, []

        def launch() -> Dispatched:
            for write in writes:  # done by now (one thread, in order): raise what one raised
                write.result()
            self.kv_caches, self.rows_state, logits, hidden = self._forward[layout](
                self.params, self.kv_caches, self.rows_state, model_buf
            )
            self.rows_state, sampled = self._sampler[layout.num_requests, variant](
                self.rows_state, logits, sample_buf
            )
            prompt = None
            if prompt_lp:
                prompt = self._prompt_lp[layout.num_tokens](
                    self.params, hidden, bufs.next_token_ids
                )
            return Dispatched(sampled, prompt)

        if self._launcher is None:
            return launch()
        return Launched(self._launcher.submit(launch))

    def collect(self, sched: SchedulerOutput, dispatched: Dispatched | Launched) -> StepOutput:
        """Wait for a dispatched step; only sampled ids (and asked-for logprobs) come back."""
        if self.watchdog is None:  # one device, or the CPU: nothing to guard, every step
            return self._collect(sched, dispatched)
        with self.watchdog.guard(f"a step of {sched.num_batched_tokens} tokens"):
            return self._collect(sched, dispatched)

    def _collect(self, sched: SchedulerOutput, dispatched: Dispatched | Launched) -> StepOutput:
        if isinstance(dispatched, Launched):
            dispatched = dispatched.future.result()  # also raises what the launch raised
        result = dispatched.sampled
        n = len(sched.requests)
        sampled = np.asarray(result.sampled_ids)[:n]
        want = [req.sampling_params.logprobs is not None for req in sched.requests]
        logprobs = None
        if any(want):
            lp, rk, ti, tl = (
                np.asarray(a)
                for a in (result.logprobs, result.ranks, result.top_ids, result.top_logprobs)
            )
            logprobs = [
                _entry(sampled[i], lp[i], rk[i], ti[i], tl[i], req.sampling_params.logprobs)
                if want[i]
                else None
                for i, req in enumerate(sched.requests)
            ]
        prompt = {}
        if dispatched.prompt is not None:
            lp, rk, ti, tl = (np.asarray(a) for a in dispatched.prompt)
            start = 0
            for req in sched.requests:
                k = req.sampling_params.prompt_logprobs
                end = start + req.num_tokens
                if k is not None:
                    last = min(req.start_position + req.num_tokens, req.num_prompt_tokens - 1)
                    count = max(last - req.start_position, 0)
                    nxt = (*req.token_ids[1:], req.next_prompt_token_id)
                    prompt[req.request_id] = [
                        _entry(
                            nxt[j], lp[start + j], rk[start + j], ti[start + j], tl[start + j], k
                        )
                        for j in range(count)
                    ]
                start = end
        return StepOutput(sampled.tolist(), logprobs, prompt)


def _entry(token_id, lp, rank, top_ids, top_lps, k: int) -> TokenLogprobs:
    return TokenLogprobs(
        int(token_id),
        float(lp),
        int(rank),
        tuple(int(i) for i in top_ids[:k]),
        tuple(float(v) for v in top_lps[:k]),
    )
