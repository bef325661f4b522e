"""`scripts/trace_step.py`'s trace summary on a hand-written Perfetto trace."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "trace_step.py"
spec = importlib.util.spec_from_file_location("trace_step", SCRIPT)
trace_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_step)

LAYERS = 2


def _trace(path: Path, num_device_steps: int) -> str:
    """Each device step: one attention kernel a layer (10 us) and a 20 us matmul, back to back;
    a 1 ms host event on the host process."""
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    ]
    t = 0
    for _ in range(num_device_steps):
        for _ in range(LAYERS):
            attention = {"name": "ragged_paged_attention", "ts": t, "dur": 10}
            events.append({"ph": "X", "pid": 1, **attention})
            events.append({"ph": "X", "pid": 1, "name": "nvjet_gemm", "ts": t + 10, "dur": 20})
            t += 30
        events.append({"ph": "X", "pid": 2, "name": "step", "ts": t, "dur": 1000})
        t += 100  # idle between steps
    file = path / "t.trace.json.gz"
    with gzip.open(file, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(file)


def test_per_step_figures_count_the_steps_the_device_ran(tmp_path):
    """Five device steps inside a trace of four `step()` calls (async scheduling: the step in
    flight at the start runs inside it too): per-step figures divide by five."""
    out = trace_step.summarize(_trace(tmp_path, 5), 4, num_layers=LAYERS)
    assert out["steps"] == 5 and out["step_calls_in_trace"] == 4
    assert out["device_busy_ms_per_step"] == 0.06  # 2 layers x 30 us
    assert out["top_kernels_ms_per_step"]["ragged_paged_attention"] == 0.02
    assert out["num_kernels_per_step"] == 4


def test_without_layers_the_step_calls_are_taken_as_is(tmp_path):
    out = trace_step.summarize(_trace(tmp_path, 5), 4)
    assert out["steps"] == 4 and out["device_busy_ms_per_step"] == 0.075


def test_kernel_kinds_split_matmuls_from_attention(tmp_path):
    out = trace_step.summarize(_trace(tmp_path, 5), 4, num_layers=LAYERS)
    assert out["kernel_kinds_ms_per_step"] == {"matmul": 0.04, "attention": 0.02}
    assert trace_step.kernel_kind("input_scatter_fusion") == "kv_write"
    assert trace_step.kernel_kind("loop_multiply_fusion") == "other"
    assert trace_step.kernel_kind("entry_mosaic_gpu_kernel") == "attention"  # the Mosaic prefill


def test_fresh_prompts_are_all_admitted_every_step(tmp_path):
    """`--batch 0 --prompts-per-step 5` on a tiny model on the CPU: every traced step takes its
    5 new prompts, so none is left waiting. With 8 seats (fewer than 2 x 5) every other call
    admitted none, while the step in flight still held its 5."""
    import subprocess
    import sys

    from tests.hf_models import write_checkpoint

    folder = write_checkpoint("llama3", tmp_path / "model")
    args = ["--model", str(folder), "--batch", "0", "--prefill-len", "16", "--input-len", "0"]
    args += ["--prompts-per-step", "5", "--steps", "4", "--out", str(tmp_path / "trace")]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["prompts_per_step"] == 5
    assert out["waiting_after"] == 0
