"""`scripts/bench_forward.py`: its JSON, and that it timed a decode step of the asked batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "bench_forward.py"

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
}


def test_json_has_every_timing(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "f.json"
    args = ["--model", str(model), "--batch", "3", "--context", "20", "--iters", "3"]
    args += ["--reps", "2", "--profile", str(tmp_path / "trace"), "--output-json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAGEJAX_GPU_GEMM": "xla"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["batch"], result["context"], result["iters"]) == (3, 20, 3)
    # A decode step: one token for each of the 3 requests, in the bucket a server with the
    # default ladders runs it in: 16 tokens, 16 requests (engine/buckets.py, request_buckets_for).
    assert (result["step_tokens"], result["step_requests"]) == (3, 3)
    assert result["bucket"] == [16, 16]
    for key in ("forward_ms", "forward_sampler_ms"):
        assert len(result[key]) == 2 and all(t > 0 for t in result[key])
    assert result["host_ms_per_forward"] > 0
    assert result["device"] == "cpu" and result["cublas_min_tokens"] is None  # from the env
    # The profile's summary (on the CPU no GPU kernels: only its shape is checked).
    assert result["profile"]["steps"] == 3
    assert set(result["profile"]) >= {"device_busy_ms_per_step", "top_kernels_ms_per_step"}
