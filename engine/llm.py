"""The offline API, as vLLM's: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from engine.config import (
    CUBLAS_MIN_TOKENS,
    CacheConfig,
    CompileConfig,
    EngineConfig,
    LoadConfig,
    SchedulerConfig,
)
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import OutputKind, RequestOutput
from engine.sampling_params import SamplingParams


def platform_defaults(
    platform: str, usage: str = "offline", large_gpu: bool = False
) -> dict[str, int]:
    """Scheduler sizes that keep a CPU start-up short and fill an accelerator.

    On an H100/H200-class GPU (`is_large_gpu`) offline runs take 1,024 requests a step, as
    vLLM does on such cards: a batch of a thousand short requests streams the weights once
    for four times the tokens of a batch of 256 (1000 x 128 in / 128 out: 13.6k -> 16.9k
    output tok/s on an H100). The step stays at 8,192 tokens, not vLLM's 16,384: both
    workloads ran within 1 % of each other at either size, and the smaller ladder compiles
    fewer, smaller executables.

    The server keeps 256 requests (its start-up compiles every bucket) and steps of at most
    2,048 tokens, a quarter of vLLM's 8,192 on such cards. Poisson arrivals bring prompts in
    bursts: with 8,192 tokens, three 1,024-token prompts and the decodes beside them ran as one
    step padded to 4,096 tokens, which held every running request and each of the three first
    tokens for ~86 ms on an H100; capped at 2,048, they run as a 2,048-token step, a 1,024-token
    one and a short third, and the first prompts' tokens come sooner. With all prompts at once
    (rate inf) the smaller steps let the first requests decode while the rest prefill, so they
    finish in turn instead of as one cohort. H100, 8,192 against 2,048 on the same arrivals
    (docs/BENCHMARKS.md, nineteenth session): rate 16 TPOT p50 lower in seven of eight runs (-1
    to -6 %; +3 % in one), TTFT p99 in seven; rate inf 3,469 -> 3,647 output tok/s (means of
    five and four runs); four buckets fewer to compile (cold start-up 34 -> 28-32 s). On an
    H200, alternated (twentieth session): rate 16 TPOT p50 -3.1 %, rate inf +3.8 %. Offline,
    1000 x 1024/128 ran even at 2,048, and 1000 x 128/128 5 % slower, so offline runs keep
    8,192.
    """
    if platform == "cpu":
        return dict(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=2048)
    if usage == "server":
        return dict(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=8192)
    if platform == "gpu" and large_gpu:
        return dict(max_num_seqs=1024, max_num_batched_tokens=8192, max_model_len=8192)
    return dict(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=8192)


def is_large_gpu() -> bool:
    """vLLM's test for its larger defaults: 70 GiB or more, and not an A100 (where they ran
    slower). jax reports its memory pool, by default 75 % of the card, so the bar here is
    48 GiB of pool: an 80 GB card passes, a 48 GB one does not."""
    import jax

    device = jax.devices()[0]
    if device.platform != "gpu" or "a100" in device.device_kind.lower():
        return False
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit", 0) >= 48 << 30


def build_engine_config(
    model: str | None = None,
    *,
    dtype: str = "auto",
    load_format: str = "auto",
    attention_backend: str = "auto",
    seed: int = 0,
    skip_tokenizer_init: bool = False,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    page_size: int | None = None,
    block_size: int | None = None,
    num_pages: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    gpu_memory_utilization: float = 0.9,
    enable_prefix_caching: bool = True,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    scheduling_policy: str = "fcfs",
    max_waiting_requests: int | None = None,
    long_prefill_token_threshold: int = 0,
    admission_horizon: int = 128,
    compute_bound_tokens: int = 512,
    token_buckets: Sequence[int] = (),
    request_buckets: Sequence[int] = (),
    compilation_cache_dir: str | None | bool = True,
    cublas_min_tokens: int | None = CUBLAS_MIN_TOKENS,
    model_max_len: int | None = None,
    step_trace_path: str | None = None,
    mesh_timeout_s: float = LoadConfig.mesh_timeout_s,
    usage: str = "offline",
) -> EngineConfig:
    """vLLM-style keyword arguments -> `EngineConfig`, with platform defaults filled in
    (`usage`: "offline" or "server", see `platform_defaults`)."""
    import jax

    defaults = platform_defaults(jax.default_backend(), usage, is_large_gpu())
    if max_model_len is None:
        max_model_len = defaults["max_model_len"]
        if model_max_len is not None:
            max_model_len = min(max_model_len, model_max_len)
    max_num_seqs = max_num_seqs or defaults["max_num_seqs"]
    batched = max_num_batched_tokens or max(defaults["max_num_batched_tokens"], max_num_seqs)
    compile_kwargs = (
        {}
        if compilation_cache_dir is True
        else {"compilation_cache_dir": compilation_cache_dir or None}
    )
    return EngineConfig(
        load=LoadConfig(
            model,
            dtype,
            load_format,
            attention_backend,
            seed,
            skip_tokenizer_init,
            tensor_parallel_size,
            mesh_timeout_s,
        ),
        cache=CacheConfig(
            page_size=page_size or block_size or 16,
            num_pages=num_pages,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=batched,
            max_model_len=max_model_len,
            policy=scheduling_policy,
            max_waiting_requests=max_waiting_requests,
            long_prefill_token_threshold=long_prefill_token_threshold,
            admission_horizon=admission_horizon,
            compute_bound_tokens=compute_bound_tokens,
        ),
        compile=CompileConfig(
            tuple(token_buckets),
            tuple(request_buckets),
            cublas_min_tokens=cublas_min_tokens,
            **compile_kwargs,
        ),
        step_trace_path=step_trace_path,
    )


def model_max_len(model: str | None, load_format: str = "auto") -> int | None:
    """The checkpoint's `max_position_embeddings` (None when it cannot be read cheaply)."""
    from pathlib import Path

    from models.config import ModelConfig
    from models.default_model import default_model_path
    from models.loader import detect_format, read_hf_config

    path = Path(model) if model is not None else default_model_path()
    fmt = detect_format(path) if load_format in ("auto", "dummy") else load_format
    return ModelConfig.from_hf_dict(read_hf_config(path, fmt)).max_position_embeddings


class LLM:
    """An engine for offline batched generation.

    Keyword arguments follow vLLM's `LLM(...)`: model, dtype, max_model_len, page_size (alias
    block_size), num_pages, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, seed,
    skip_tokenizer_init, load_format, gpu_memory_utilization, kv_cache_memory_bytes,
    tensor_parallel_size, ...
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        if "max_model_len" not in kwargs:
            kwargs["model_max_len"] = model_max_len(model, kwargs.get("load_format", "auto"))
        self.engine = LLMEngine(build_engine_config(model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns `RequestOutput`s in input order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        # Validate everything first, so a bad prompt schedules nothing.
        for prompt, p in zip(prompts, params, strict=True):
            self.engine.inputs.validate(self.engine.inputs.tokenize(prompt)[1], p)
        for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params, strict=True)):
            self.engine.add_request(rid, prompt, p, priority=priority[i] if priority else 0)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then `generate`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [
            {
                "prompt_token_ids": _as_ids(
                    tok.apply_chat_template(
                        conv,
                        chat_template=chat_template,
                        add_generation_prompt=add_generation_prompt,
                        tokenize=True,
                    )
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step(kind=OutputKind.FINAL_ONLY):
                done[out.request_id] = out
                bar.update(1)
        bar.close()
        return [done[i] for i in ids]


def _as_ids(x) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding in newer transformers."""
    if isinstance(x, dict) or hasattr(x, "input_ids"):
        x = x["input_ids"]
    return list(x)
