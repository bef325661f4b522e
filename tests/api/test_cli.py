"""`pagejax generate` end to end in a subprocess, against transformers' greedy continuation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.config import CUBLAS_MIN_TOKENS
from tests.hf_models import hf_greedy


def test_generate_prints_the_greedy_continuation(model_dir, tmp_path):
    from transformers import AutoTokenizer

    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(prompt)
    want = prompt + tok.decode(hf_greedy(model_dir, ids, 8), skip_special_tokens=True)
    cmd = [
        sys.executable,
        "-m",
        "api.cli",
        "generate",
        prompt,
        "--model",
        str(model_dir),
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "4",
        "--max-num-batched-tokens",
        "64",
        "--num-pages",
        "64",
        "--compilation-cache-dir",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip("\n") == want


def test_generate_reports_a_bad_model_path(tmp_path):
    cmd = [sys.executable, "-m", "api.cli", "generate", "hi", "--model", str(tmp_path / "nope")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


NCCL = "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"


@pytest.mark.parametrize(
    ("flags", "preset", "xla_flags", "want", "want_xla_flags"),
    [
        ([], None, None, "0.92", None),
        (["-tp", "2"], None, None, "0.92", NCCL),
        (["-tp", "2"], "0.5", "--xla_dump_to=/tmp/d", "0.5", f"--xla_dump_to=/tmp/d {NCCL}"),
        (["-tp", "2"], None, NCCL.replace("false", "true"), "0.92", NCCL.replace("false", "true")),
    ],
)
def test_the_command_sets_jax_gpu_pool_and_split_all_reduces(
    flags, preset, xla_flags, want, want_xla_flags, monkeypatch, tmp_path
):
    """The `pagejax` command sets jax's GPU pool before any device is touched, 92 % of one
    device and of each of several, and split, all-reduces through NCCL (XLA_FLAGS); what the
    user set is kept, and their other XLA flags too."""
    from api.cli import main

    for name, value in (("XLA_PYTHON_CLIENT_MEM_FRACTION", preset), ("XLA_FLAGS", xla_flags)):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores it, set or not, afterwards
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    argv = ["generate", "hi", "--model", str(tmp_path / "nope"), *flags]
    assert main(argv, owns_process=True) == 2  # the missing model, after the pool is set
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == want
    assert os.environ.get("XLA_FLAGS") == want_xla_flags


def test_scheduler_flags_reach_the_engine_config():
    """`--admission-horizon`, `--long-prefill-token-threshold` and `--compute-bound-tokens`
    land in SchedulerConfig."""
    from api.cli import build_parser, engine_kwargs
    from engine.llm import build_engine_config

    argv = ["serve", "--admission-horizon", "0", "--long-prefill-token-threshold", "256"]
    argv += ["--compute-bound-tokens", "0"]
    config = build_engine_config(None, **engine_kwargs(build_parser().parse_args(argv)))
    assert config.scheduler.admission_horizon == 0
    assert config.scheduler.long_prefill_token_threshold == 256
    assert config.scheduler.compute_bound_tokens == 0
    default = build_engine_config(None, **engine_kwargs(build_parser().parse_args(["serve"])))
    assert default.scheduler.admission_horizon == 128
    assert default.scheduler.compute_bound_tokens == 512


def test_bucket_ladders_reach_the_compile_config():
    """`serve --token-buckets ... --request-buckets ...` compile those ladders (a 1,088-token
    rung, say); without them, the platform's (empty: `bucket_ladder` at start-up)."""
    from api.cli import build_parser, engine_kwargs
    from engine.llm import build_engine_config

    argv = ["serve", "--max-num-batched-tokens", "2048", "--max-num-seqs", "16"]
    argv += ["--token-buckets", "16", "1024", "1088", "2048", "--request-buckets", "8", "16"]
    config = build_engine_config(None, **engine_kwargs(build_parser().parse_args(argv)))
    assert config.compile.token_buckets == (16, 1024, 1088, 2048)
    assert config.compile.request_buckets == (8, 16)
    default = build_engine_config(None, **engine_kwargs(build_parser().parse_args(["serve"])))
    assert default.compile.token_buckets == default.compile.request_buckets == ()


@pytest.mark.parametrize(
    "value, want", [(None, CUBLAS_MIN_TOKENS), ("xla", None), ("32", 32), ("auto", 128)]
)
def test_gpu_gemm_environment_reaches_the_compile_config(value, want, monkeypatch):
    """`PAGEJAX_GPU_GEMM` sets `CompileConfig.cublas_min_tokens`; "xla" (None) survives the
    CLI's dropping of unset flags."""
    from api.cli import build_parser, engine_kwargs
    from engine.llm import build_engine_config

    if value is None:
        monkeypatch.delenv("PAGEJAX_GPU_GEMM", raising=False)
    else:
        monkeypatch.setenv("PAGEJAX_GPU_GEMM", value)
    config = build_engine_config(None, **engine_kwargs(build_parser().parse_args(["serve"])))
    assert config.compile.cublas_min_tokens == want


def test_a_bad_gpu_gemm_setting_is_refused_by_name(monkeypatch):
    from api.cli import build_parser, engine_kwargs

    for bad in ("cublas", "²", "-1"):
        monkeypatch.setenv("PAGEJAX_GPU_GEMM", bad)
        with pytest.raises(ValueError, match="PAGEJAX_GPU_GEMM"):
            engine_kwargs(build_parser().parse_args(["serve"]))


@pytest.mark.parametrize("value, want", [(None, 120.0), ("0", 0.0), ("30", 30.0)])
def test_mesh_timeout_environment_reaches_the_load_config(value, want, monkeypatch):
    """`PAGEJAX_MESH_TIMEOUT_S` sets `LoadConfig.mesh_timeout_s` (the mesh watchdog's limit);
    unset, the engine's default."""
    from api.cli import build_parser, engine_kwargs
    from engine.llm import build_engine_config

    monkeypatch.setenv("PAGEJAX_MESH_TIMEOUT_S", "")
    if value is not None:
        monkeypatch.setenv("PAGEJAX_MESH_TIMEOUT_S", value)
    config = build_engine_config(None, **engine_kwargs(build_parser().parse_args(["serve"])))
    assert config.load.mesh_timeout_s == want


def test_a_bad_mesh_timeout_is_refused_by_name(monkeypatch):
    from api.cli import build_parser, engine_kwargs
    from engine.llm import build_engine_config

    monkeypatch.setenv("PAGEJAX_MESH_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="PAGEJAX_MESH_TIMEOUT_S"):
        engine_kwargs(build_parser().parse_args(["serve"]))
    monkeypatch.setenv("PAGEJAX_MESH_TIMEOUT_S", "-5")
    with pytest.raises(ValueError, match="mesh_timeout_s"):
        build_engine_config(None, **engine_kwargs(build_parser().parse_args(["serve"])))
