"""`pagejax` command line: generate, serve, bench. Flags and environment are read here only."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from engine.config import parse_gpu_gemm
from engine.engine_core import EngineStartError

# pallas_kernels.attention.AttentionBackend's values (api imports engine only: DESIGN.md).
ATTENTION_BACKENDS = ["auto", "pallas", "reference", "pallas-interpret-gpu", "pallas-interpret-tpu"]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """vLLM's engine flag names."""
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--load-format", default="auto", choices=["auto", "safetensors", "gguf", "orbax", "dummy"]
    )
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="split each layer's heads and MLP width, and the KV cache, over this many devices",
    )
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--block-size", "--page-size", dest="page_size", type=int)
    p.add_argument("--num-pages", type=int)
    p.add_argument("--kv-cache-memory", dest="kv_cache_memory_bytes", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    p.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        help="at most this many prompt tokens of one request per step (0 = no cap)",
    )
    p.add_argument(
        "--admission-horizon",
        type=int,
        help="admit a request only while the pages for the running requests' next N tokens "
        "stay free (default 128; 0 = admit whenever the chunk fits, as vLLM does)",
    )
    p.add_argument(
        "--compute-bound-tokens",
        type=int,
        help="from this token bucket on, padded decode rows cost matmul time: running "
        "requests stop at the bucket below when the KV cache would fill less than 3/4 of it "
        "(default 512; 0 = never)",
    )
    p.add_argument(
        "--token-buckets",
        type=int,
        nargs="+",
        help="the step sizes (tokens) compiled, ascending, up to at least "
        "--max-num-batched-tokens (default on a GPU or TPU: powers of two from 16)",
    )
    p.add_argument(
        "--request-buckets",
        type=int,
        nargs="+",
        help="the request counts compiled per step, ascending, up to at least --max-num-seqs "
        "(default on a GPU or TPU: powers of two from 8)",
    )
    p.add_argument(
        "--compilation-cache-dir",
        default=None,
        help='compiled executables kept between runs (default ~/.cache/pagejax/xla; "" = off)',
    )


def mesh_timeout(value: str) -> float | None:
    """PAGEJAX_MESH_TIMEOUT_S: seconds a call on an accelerator mesh may take before the
    process ends (`engine.watchdog`); 0 = no limit, "" = the engine's default (None)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        msg = f"PAGEJAX_MESH_TIMEOUT_S must be a number of seconds, not {value!r}"
        raise ValueError(msg) from None


def engine_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(
        dtype=args.dtype,
        load_format=args.load_format,
        attention_backend=args.attention_backend,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size,
        num_pages=args.num_pages,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        admission_horizon=args.admission_horizon,
        compute_bound_tokens=args.compute_bound_tokens,
        token_buckets=args.token_buckets and tuple(args.token_buckets),
        request_buckets=args.request_buckets and tuple(args.request_buckets),
    )
    if args.compilation_cache_dir is not None:
        kw["compilation_cache_dir"] = args.compilation_cache_dir
    kw["step_trace_path"] = os.environ.get("PAGEJAX_STEP_TRACE")  # one JSON line per step
    kw["mesh_timeout_s"] = mesh_timeout(os.environ.get("PAGEJAX_MESH_TIMEOUT_S", ""))
    kw = {k: v for k, v in kw.items() if v is not None}
    # None is a setting here (XLA's own GEMM choice), not "unset".
    kw["cublas_min_tokens"] = parse_gpu_gemm(os.environ.get("PAGEJAX_GPU_GEMM", "auto"))
    return kw


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        max_tokens=args.max_tokens,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
        repetition_penalty=args.repetition_penalty,
    )
    llm = LLM(args.model, **engine_kwargs(args))
    if args.chat:
        outs = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        outs = llm.generate(args.prompt, params)
    for completion in outs[0].outputs:
        print(args.prompt + completion.text if not args.chat else completion.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagejax", description="LLM serving on JAX")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt offline")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    add_engine_args(g)
    g.set_defaults(func=_generate)

    try:
        from api import serve_cli

        serve_cli.add_parser(sub)
    except ImportError:
        pass
    try:
        from api import bench_cli

        bench_cli.add_parser(sub)
    except ImportError:
        pass
    return parser


# The share of each GPU that jax's memory pool takes (`XLA_PYTHON_CLIENT_MEM_FRACTION`). jax
# takes 75 % unless told otherwise, and the KV cache is sized from the pool
# (`--gpu-memory-utilization` of it). Outside it: CUDA's context (0.5 GiB) and, split over
# several GPUs, NCCL's buffers and the like: the 8B model split over two GPUs peaked 1.0 GiB a
# device above a pool that left an H100's 8 % outside it (95.4 % of an H200; twenty-sixth
# session), so 92 % leaves an H100 5.4 GiB spare, split or not.
GPU_POOL_FRACTION = "0.92"
# Split, every all-reduce goes through NCCL: XLA's own one-shot all-reduce kernel (its default
# for small ones) keeps scratch memory outside the pool for each all-reduce of every
# executable, 5.3 GiB a device for the 8B model's 44 executables on two GPUs, and ran two
# H100s out of memory at a 92 % pool (twenty-fourth session). Batch 1 and 64 ran as fast
# either way, within the spread between runs (twenty-fifth). Given per executable (compile
# options, every executable, twenty-sixth) it kept the scratch, though XLA's thunks read it
# from the module's options; why is not known, so it goes in XLA_FLAGS.
NCCL_ALL_REDUCE_FLAG = "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"


def set_jax_env(tensor_parallel_size: int) -> None:
    """What the `pagejax` command sets before jax starts its GPU client, which reads it: the
    pool's share of each GPU, and for a split model the all-reduces through NCCL. A value the
    user set is kept."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_POOL_FRACTION)
    flags = os.environ.get("XLA_FLAGS", "")
    if tensor_parallel_size > 1 and "all_reduce_one_shot_kernel" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {NCCL_ALL_REDUCE_FLAG}".strip()


def main(argv: list[str] | None = None, *, owns_process: bool = False) -> int:
    """Run one command. `owns_process`: nothing else runs in this process (the `pagejax`
    command), so the benchmarks may freeze its heap after start-up (`freeze_heap`)."""
    args = build_parser().parse_args(argv)
    args.owns_process = owns_process
    if owns_process:
        set_jax_env(getattr(args, "tensor_parallel_size", 1))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pagejax: error: {e}", file=sys.stderr)
        return 2
    except EngineStartError as e:  # the engine process logged its traceback already
        print(f"pagejax: error: the engine failed to start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the server has shut down already (uvicorn re-raises)
        return 130


def entry() -> int:
    """The `pagejax` command (and `python -m api.cli`): `main` in a process that blocks torch,
    which no command uses but transformers imports for any tokenizer when it is installed
    (10 s with CUDA's libraries), and whose jax takes most of the GPU (`set_jax_env`).
    Callers of `main` in their own process keep their torch and their jax settings."""
    from models.tokenizer import block_torch_import

    block_torch_import()
    return main(owns_process=True)


if __name__ == "__main__":
    sys.exit(entry())
