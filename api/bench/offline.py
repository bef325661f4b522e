"""Shared by `bench throughput` and `bench latency`: engine start-up (timed apart from the run),
random token prompts, and the step loop that times one batch of requests."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from api.cli import add_engine_args, engine_kwargs
from engine.outputs import OutputKind

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Files whose presence means a model folder carries its own tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "source_gguf.txt")


def add_offline_args(p: argparse.ArgumentParser, *, input_len: int, output_len: int) -> None:
    """Flags common to the offline benchmarks, plus vLLM's engine flags."""
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or .gguf (default: the model's; none for a config-only folder)",
    )
    p.add_argument("--skip-tokenizer-init", action="store_true", help="no detokenization")
    p.add_argument("--input-len", type=int, default=input_len, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=output_len, help="new tokens per request")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy; vLLM's bench throughput/latency sample at 1.0 (top_p 1.0)",
    )
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")
    p.add_argument("--disable-tqdm", action="store_true")
    add_engine_args(p)


def has_tokenizer(model: str | None) -> bool:
    """True when `model` (None = the default GGUF) carries a tokenizer we can load."""
    if model is None:
        return True
    path = Path(model)
    if path.suffix == ".gguf":
        return True
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def start_engine(args: argparse.Namespace) -> tuple[LLMEngine, float]:
    """Load, size the KV cache and compile every bucket; returns (engine, seconds it took)."""
    from engine.llm import build_engine_config, model_max_len
    from engine.llm_engine import LLMEngine, freeze_heap
    from models.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = engine_kwargs(args)
    if "max_model_len" not in kwargs:
        kwargs["model_max_len"] = model_max_len(args.model, args.load_format)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tokenizer is None and (args.skip_tokenizer_init or not has_tokenizer(args.model)):
        logger.info("no tokenizer: outputs are token ids only (no detokenization cost)")
        kwargs["skip_tokenizer_init"] = True
    engine = LLMEngine(build_engine_config(args.model, **kwargs), tokenizer=tokenizer)
    if getattr(args, "owns_process", False):
        freeze_heap()
    return engine, time.perf_counter() - t0


def check_lengths(engine: LLMEngine, input_len: int, output_len: int) -> None:
    """Raise a clear ValueError when a request of these lengths cannot run."""
    if input_len < 1 or output_len < 1:
        raise ValueError("--input-len and --output-len must be at least 1")
    limit = engine.config.scheduler.max_model_len
    if input_len + output_len > limit:
        raise ValueError(
            f"input_len + output_len = {input_len + output_len} exceeds max_model_len {limit}; "
            "raise --max-model-len"
        )


def random_token_prompts(
    rng: np.random.Generator, num_prompts: int, input_len: int, vocab_size: int
) -> list[list[int]]:
    """`num_prompts` prompts of `input_len` token ids drawn uniformly from [0, vocab_size)."""
    return rng.integers(0, vocab_size, size=(num_prompts, input_len)).tolist()


@dataclass(frozen=True)
class BatchRun:
    """One batch run to completion."""

    elapsed: float  # s, from the first add_request to the last request finishing
    ttft: float  # s, until every request had its first output token
    outputs: list[RequestOutput]  # in prompt order


def prepare_run(args: argparse.Namespace, num_prompts: int):
    """Start the engine and draw the run's prompts: (engine, startup seconds, prompts, params).
    Random token-id prompts of `--input-len`, `--output-len` new tokens each, EOS ignored."""
    from engine.sampling_params import SamplingParams

    engine, startup = start_engine(args)
    check_lengths(engine, args.input_len, args.output_len)
    rng = np.random.default_rng(args.seed)
    prompts = random_token_prompts(rng, num_prompts, args.input_len, engine.model_config.vocab_size)
    params = SamplingParams(
        max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature
    )
    return engine, startup, prompts, params


def run_batch(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    desc: str | None = None,
    first_token_times: bool = True,
) -> BatchRun:
    """Add every prompt, step the engine until all finish; `desc` shows a progress bar.
    Without `first_token_times` the engine returns finished requests only (as `LLM.generate`
    does, and vLLM's bench throughput), so `ttft` is the whole run."""
    tag = uuid.uuid4().hex[:8]
    ids = [f"bench-{tag}-{i}" for i in range(len(prompts))]
    bar = tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False)
    first: dict[str, float] = {}
    done: dict[str, RequestOutput] = {}
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    kind = OutputKind.CUMULATIVE if first_token_times else OutputKind.FINAL_ONLY
    while engine.has_unfinished_requests():
        for out in engine.step(kind=kind):
            if out.request_id not in first and any(c.token_ids for c in out.outputs):
                first[out.request_id] = time.perf_counter() - t0
            if out.finished:
                done[out.request_id] = out
                bar.update(1)
    elapsed = time.perf_counter() - t0
    bar.close()
    return BatchRun(elapsed, max(first.values(), default=elapsed), [done[i] for i in ids])


def environment_info() -> dict[str, Any]:
    """Where and when a result was measured (for docs/BENCHMARKS.md)."""
    import jax

    device = jax.devices()[0]
    return {
        "backend": "pagejax",
        "jax_version": jax.__version__,
        "device": getattr(device, "device_kind", device.platform),
        "num_devices": jax.device_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def json_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags that can go into JSON (drops the handler function)."""
    plain = (str, int, float, bool, list, tuple, type(None))
    return {k: v for k, v in vars(args).items() if isinstance(v, plain)}


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write `result` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=4) + "\n")
