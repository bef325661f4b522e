"""The synchronous engine: load, size the KV cache, compile, then `step()` =
`schedule() -> execute() -> update()` plus output processing."""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import gc
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from engine.config import EngineConfig
from engine.inputs import InputProcessor, PromptType
from engine.output_processor import OutputProcessor
from engine.outputs import OutputKind, RequestOutput
from engine.page_allocator import PageAllocator
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_fns import PROMPT_LOGPROBS_CHUNK
from engine.types import Request, SchedulerOutput

logger = logging.getLogger(__name__)


def _platform_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def kv_bytes_per_page(model_config, page_size: int, itemsize: int, num_shards: int = 1) -> int:
    """A page's bytes on each device (a tensor-parallel model splits the KV heads)."""
    c = model_config
    return 2 * c.num_layers * c.num_kv_heads // num_shards * c.head_dim * page_size * itemsize


def num_kv_pages(config: EngineConfig, model_config, itemsize: int, num_shards: int = 1) -> int:
    """Pages that fit the memory budget (see `CacheConfig`): of one device, the first of a
    tensor-parallel model's (each holds the same share of the weights and the cache)."""
    cache, sched = config.cache, config.scheduler
    per_page = kv_bytes_per_page(model_config, cache.page_size, itemsize, num_shards)
    if cache.num_pages is not None:
        return cache.num_pages
    if cache.kv_cache_memory_bytes is not None:
        return max(cache.kv_cache_memory_bytes // per_page, 2)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:  # CPU: enough for every sequence at full length, <= 1 GiB
        want = sched.max_num_seqs * -(-sched.max_model_len // cache.page_size) + 1
        return int(min(want, max((1 << 30) // per_page, 2)))
    c, t, r = model_config, sched.max_num_batched_tokens, sched.max_num_seqs
    # Device temporaries at the peak, besides the weights and the cache. Measured with
    # `memory_analysis()` (8B model, H100): the forward at 8,192 tokens 0.35 GiB; the full
    # sampler at 1,024 rows 2.9 GiB, six f32 [R, V] copies; prompt logprobs 1.5 GiB, six f32
    # [512, V] copies. The executables run one after another, so the largest one counts, plus
    # the f32 [R, V] logits that the forward hands to the sampler. About 2x margin on each.
    # The runner's per-row state (penalty counts, bias, masks: 10 bytes per [R + 1, V] entry,
    # 1.3 GB at 1,024 rows of a 128k vocabulary) is allocated after this, so it counts too.
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    forward = 4 * t * (2 * c.hidden_size + 2 * c.intermediate_size + qkv)
    sampler = 12 * r * c.vocab_size * 4
    prompt_logprobs = 12 * PROMPT_LOGPROBS_CHUNK * c.vocab_size * 4
    rows_state = (r + 1) * c.vocab_size * 10
    act = max(forward, sampler, prompt_logprobs) + r * c.vocab_size * 4 + rows_state + (1 << 30)
    budget = stats["bytes_limit"] * cache.gpu_memory_utilization - stats["bytes_in_use"] - act
    if budget < per_page * 2:
        raise ValueError(
            "no memory left for the KV cache: lower max_num_batched_tokens or use "
            "a smaller model / higher gpu_memory_utilization"
        )
    return int(budget // per_page)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, model=None, tokenizer=None):
        from models.loader import load_model

        t_start = time.perf_counter()
        load = config.load
        tokenizer_job = None
        if tokenizer is None and not load.skip_tokenizer_init:
            # Loaded beside the weights and the compile: about 1.5 s, mostly imports.
            from models.tokenizer import load_tokenizer

            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
            tokenizer_job = pool.submit(load_tokenizer, load.model)
            pool.shutdown(wait=False)
        if model is None:
            model = load_model(
                load.model,
                dtype=_platform_dtype(load.dtype),
                load_format=load.load_format,
                attention_backend=_resolve_backend(load.attention_backend),
                seed=load.seed,
                tensor_parallel_size=load.tensor_parallel_size,
            )
        if tokenizer_job is not None and tokenizer_job.done():
            tokenizer_job.result()  # a broken tokenizer fails now, not after the compile
        mc = model.config
        max_len = config.scheduler.max_model_len
        if max_len > mc.max_position_embeddings:
            logger.warning(
                "max_model_len %d exceeds the model's max_position_embeddings %d",
                max_len,
                mc.max_position_embeddings,
            )
        self.config = config
        self.model_config = mc
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))  # so the log times the load
        t_loaded = time.perf_counter()
        itemsize = model.model.embed_tokens.embedding[...].dtype.itemsize
        num_pages = num_kv_pages(config, mc, itemsize, model.num_shards)
        self.allocator = PageAllocator(
            num_pages, config.cache.page_size, config.cache.enable_prefix_caching
        )
        self.runner = ModelRunner(model, config, num_pages=num_pages)
        self.scheduler = Scheduler(
            config.scheduler, self.allocator, self.runner.buckets.token_buckets
        )
        t_compile = time.perf_counter()
        self.runner.compile()
        t_warm = time.perf_counter()
        if jax.default_backend() != "cpu":  # first-run kernel loading, off the request path
            self.runner.warm_up()
        t_warmed = time.perf_counter()
        if tokenizer_job is not None:
            tokenizer = tokenizer_job.result()
        self.tokenizer = tokenizer
        self.eos_token_ids = self.runner.eos_token_ids = _eos_ids(mc, tokenizer)
        t_end = time.perf_counter()
        logger.info(
            "KV cache: %d pages of %d tokens; %d buckets. Start-up %.1f s: load %.1f s, "
            "set-up %.1f s, compile %.1f s, warm-up %.1f s",
            num_pages, config.cache.page_size, len(self.runner.buckets.layouts()), t_end - t_start,
            t_loaded - t_start, t_compile - t_loaded, t_warm - t_compile, t_warmed - t_warm,
        )  # fmt: skip
        self.outputs = OutputProcessor(tokenizer)
        self.inputs = InputProcessor(tokenizer, max_len, mc.vocab_size)
        self._inflight: tuple | None = None  # (SchedulerOutput, Dispatched) of the step in flight
        trace = config.step_trace_path
        self._trace = StepTrace(trace) if trace else None
        if self._trace is not None and self.runner.watchdog is not None:
            self.runner.watchdog.before_exit.append(self._trace.flush)  # the last steps matter

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        text, token_ids = self.inputs.tokenize(prompt)
        self.inputs.validate(token_ids, params)
        if self.outputs.has(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        extra_eos = [t for t in self.eos_token_ids[1:] if t not in params.stop_token_ids]
        child_params = params
        if extra_eos and not params.ignore_eos:  # e.g. Llama 3's <|eot_id|> besides <|end_of_text|>
            child_params = dataclasses.replace(
                params, stop_token_ids=[*params.stop_token_ids, *extra_eos]
            )
        ids = self.outputs.add_request(request_id, text, token_ids, params)
        now = time.monotonic() if arrival_time is None else arrival_time
        try:
            for i, cid in enumerate(ids):
                p = child_params
                if params.n > 1 and params.seed is not None:  # distinct, reproducible streams
                    p = dataclasses.replace(child_params, seed=params.seed + i)
                self.scheduler.add_request(
                    Request(
                        cid,
                        token_ids,
                        p,
                        now,
                        priority,
                        self.eos_token_ids[0] if self.eos_token_ids else None,
                    )
                )
        except Exception:
            self.scheduler.abort_request(ids)
            self.outputs.abort(request_id)
            raise

    def abort_request(self, request_ids: str | Sequence[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outs = []
        for rid in ids:
            self.scheduler.abort_request(self.outputs.child_ids(rid))
            out = self.outputs.abort(rid)
            if out is not None:
                outs.append(out)
        return outs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._inflight is not None

    # -- the step ---------------------------------------------------------------------------
    def step(self, *, kind: OutputKind = OutputKind.CUMULATIVE) -> list[RequestOutput]:
        """Schedule and dispatch step N + 1, then wait for step N and turn it into outputs.

        Async scheduling: the host schedules, builds and dispatches step N + 1 while step N
        runs; a request's input token sampled by step N is read on the device (`-1` in
        `ScheduledRequest.token_ids`). So outputs lag the device by one step, and a request
        that step N finishes (EOS, a stop string) has one wasted step N + 1, whose result
        `Scheduler.update` drops.
        """
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        t1 = time.perf_counter()
        dispatched = self.runner.dispatch(sched)
        t2 = t3 = time.perf_counter()
        outputs = []
        # Record step N + 1 as in flight before collecting step N, so that an error below does
        # not lose it (its input buffers are reused two dispatches on: `BufferPool`).
        previous = self._inflight
        self._inflight = None if dispatched is None else (sched, dispatched)
        if previous is not None:
            prev_sched, prev = previous
            step_out = self.runner.collect(prev_sched, prev)
            t3 = time.perf_counter()
            updates = self.scheduler.update(prev_sched, step_out)
            requests = self.scheduler.requests
            cached = {  # set at admission: only requests still in their prompt can be new
                r.request_id: requests[r.request_id].num_cached_tokens
                for r in prev_sched.requests
                if r.start_position < r.num_prompt_tokens and r.request_id in requests
            }
            outputs, stopped = self.outputs.process(updates, kind=kind, num_cached=cached)
            for cid, stop_str in stopped:
                self.scheduler.finish_requests(cid, "stop", stop_str)
        if self._trace is not None:
            bucket = 0 if sched.is_empty else self.runner.buckets.layout_for(sched).num_tokens
            times = (t0, t1, t2, t3, time.perf_counter())
            self._trace.record(sched, bucket, times, len(outputs), self.scheduler.requests)
        return outputs


class StepTrace:
    """Per-step timings as JSON lines, for finding where serving time goes
    (`EngineConfig.step_trace_path`; the CLI reads `PAGEJAX_STEP_TRACE`). One line per
    `LLMEngine.step`: its start `t` (seconds, perf_counter), the host milliseconds to schedule
    and dispatch step N + 1, the milliseconds blocked waiting for step N, and the host
    milliseconds turning N into outputs; then step N + 1's size: tokens, its token bucket,
    requests and prefill tokens; and the arrival times (`time.monotonic`, the clock of `t`
    on Linux) of the requests whose prompt starts computing (`prompt_starts`; after any
    prefix-cache hit) or ends, sampling its first token (`prompt_ends`), in step N + 1: they
    tie a client's requests to their steps (scripts/step_trace_summary.py --ttft). A request
    recomputed after preemption, and the `n` samples of one request, repeat an arrival: the
    first occurrence is the prompt's. The file is flushed when the engine idles and at least
    once a second of steps, so a reader sees a busy run's steps as it goes."""

    FLUSH_EVERY_S = 1.0

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - open for the run
        self._flushed = time.perf_counter()
        atexit.register(self.flush)

    def flush(self) -> None:
        self._file.flush()

    def record(
        self,
        sched: SchedulerOutput,
        bucket: int,
        times: tuple[float, ...],
        num_outputs: int,
        requests: dict[str, Request],
    ) -> None:
        t0, t1, t2, t3, t4 = times
        n = sched.num_batched_tokens
        starts, ends = [], []
        for r in sched.requests:
            request = requests.get(r.request_id)
            if r.start_position < r.num_prompt_tokens and request is not None:
                arrival = round(request.arrival_time, 6)
                if r.start_position == request.num_cached_tokens:  # after a prefix-cache hit
                    starts.append(arrival)
                if r.sample:
                    ends.append(arrival)
        line = {
            "t": round(t0, 6),
            "schedule_ms": round(1e3 * (t1 - t0), 3),
            "dispatch_ms": round(1e3 * (t2 - t1), 3),
            "wait_ms": round(1e3 * (t3 - t2), 3),
            "outputs_ms": round(1e3 * (t4 - t3), 3),
            "tokens": n,
            "bucket": bucket,
            "requests": len(sched.requests),
            "prefill_tokens": sum(r.num_tokens for r in sched.requests if r.num_tokens > 1),
            "outputs": num_outputs,
            "prompt_starts": starts,
            "prompt_ends": ends,
        }
        self._file.write(json.dumps(line) + "\n")
        # Idle is a good moment to make the file readable; a busy run flushes now and then.
        if n == 0 or t0 - self._flushed >= self.FLUSH_EVERY_S:
            self.flush()
            self._flushed = t0


def freeze_heap() -> None:
    """Collect once, then take every live object out of the garbage collector's generations
    (`gc.freeze`, as vLLM's engine process does after start-up). The start-up heap (jax, the
    model, the tokenizer: about half a million objects) is then never traversed again by the
    collections that the step loop's allocations trigger. For processes that own the engine
    (the server's engine process, the benchmarks); a user's `LLM` leaves their heap alone."""
    gc.collect()
    gc.freeze()


def _resolve_backend(name: str) -> str:
    from pallas_kernels.attention import resolve_backend

    return resolve_backend(name).value


def _eos_ids(model_config, tokenizer: Any) -> tuple[int, ...]:
    ids = list(model_config.eos_token_ids)
    tok_eos = None if tokenizer is None else tokenizer.eos_token_id
    if tok_eos is not None and tok_eos not in ids:
        ids.insert(0, tok_eos)
    return tuple(int(i) for i in ids)
