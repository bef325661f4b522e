"""`scripts/trace_step.py`'s trace summary on a hand-written Perfetto trace."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from tests.scripts import SCRIPTS, load_script

trace_step = load_script("trace_step")
SCRIPT = SCRIPTS / "trace_step.py"

LAYERS = 2


def _trace(
    path: Path,
    num_device_steps: int,
    attention_name="ragged_paged_attention",
    matmul_name="nvjet_gemm",
    num_devices: int = 1,
    first_gpu: int = 0,
) -> str:
    """Each device step: one attention kernel a layer (10 us) and a 20 us matmul, back to back;
    a 1 ms host event on the host process. With several devices (a split model), each runs
    the same kernels, device d's `d` us later; the devices are GPU `first_gpu` onwards."""
    first = {"name": f"/device:GPU:{first_gpu}"}
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": first},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    ]
    extra = {10 + d: d for d in range(1, num_devices)}  # pid -> device
    for pid, d in extra.items():
        events.append(
            {
                "ph": "M",
                "name": "process_name",
                "pid": pid,
                "args": {"name": f"/device:GPU:{first_gpu + d}"},
            }
        )
    t = 0
    for _ in range(num_device_steps):
        for _ in range(LAYERS):
            for pid, d in {1: 0, **extra}.items():
                attention = {"name": attention_name, "ts": t + d, "dur": 10}
                events.append({"ph": "X", "pid": pid, **attention})
                matmul = {"name": matmul_name, "ts": t + d + 10, "dur": 20}
                events.append({"ph": "X", "pid": pid, **matmul})
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


def test_a_split_models_figures_are_one_devices(tmp_path):
    """Two GPUs each running the step's kernels 1 us apart: the figures are the first GPU's
    alone, not the sum of both nor the union of their (overlapping) intervals."""
    for first_gpu in (0, 9):  # GPUs 9 and 10 (CUDA_VISIBLE_DEVICES): GPU 9's figures
        trace = _trace(tmp_path, 5, num_devices=2, first_gpu=first_gpu)
        out = trace_step.summarize(trace, 4, num_layers=LAYERS)
        assert out["devices_in_trace"] == 2 and out["steps"] == 5
        assert out["device_busy_ms_per_step"] == 0.06
        assert out["num_kernels_per_step"] == 4


def test_mosaic_attention_launches_count_the_steps_too(tmp_path):
    trace = _trace(tmp_path, 5, attention_name="entry_mosaic_gpu_kernel")
    out = trace_step.summarize(trace, 4, num_layers=LAYERS)
    assert out["steps"] == 5 and out["kernel_kinds_ms_per_step"]["attention"] == 0.02


def test_the_fused_gate_up_kernel_is_a_matmul_not_an_attention_launch(tmp_path):
    """Both Mosaic GPU kernels in one step: only the attention kernel counts the layers."""
    trace = _trace(
        tmp_path,
        5,
        attention_name="entry_mosaic_gpu_kernel",
        matmul_name="gate_up_matmul_mosaic_gpu_kernel",
    )
    out = trace_step.summarize(trace, 4, num_layers=LAYERS)
    assert out["steps"] == 5
    assert out["kernel_kinds_ms_per_step"] == {"matmul": 0.04, "attention": 0.02}


def test_without_layers_the_step_calls_are_taken_as_is(tmp_path):
    out = trace_step.summarize(_trace(tmp_path, 5), 4)
    assert out["steps"] == 4 and out["device_busy_ms_per_step"] == 0.075


def test_kernel_kinds_split_matmuls_from_attention(tmp_path):
    out = trace_step.summarize(_trace(tmp_path, 5), 4, num_layers=LAYERS)
    assert out["kernel_kinds_ms_per_step"] == {"matmul": 0.04, "attention": 0.02}
    assert trace_step.kernel_kind("input_scatter_fusion") == "kv_write"
    assert trace_step.kernel_kind("loop_multiply_fusion") == "other"
    assert trace_step.kernel_kind("entry_mosaic_gpu_kernel") == "attention"  # the Mosaic prefill


def _run_script(tmp_path, *args: str) -> dict:
    """trace_step.py on a tiny random Llama on the CPU; its JSON line."""
    import subprocess
    import sys

    from tests.hf_models import write_checkpoint

    folder = write_checkpoint("llama3", tmp_path / "model")
    argv = [sys.executable, str(SCRIPT), "--model", str(folder), "--steps", "4", *args]
    argv += ["--out", str(tmp_path / "trace")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_prompts_are_all_admitted_every_step(tmp_path):
    """`--batch 0 --prompts-per-step 5`: every traced step takes its 5 new prompts, so none is
    left waiting. With 8 seats (fewer than 2 x 5) every other call admitted none, while the
    step in flight still held its 5."""
    out = _run_script(
        tmp_path,
        "--batch",
        "0",
        "--prefill-len",
        "16",
        "--input-len",
        "0",
        "--prompts-per-step",
        "5",
    )
    assert out["prompts_per_step"] == 5
    assert out["waiting_after"] == 0
    assert out["long_prompt_tokens_per_step"] is None


def test_mixed_steps_carry_the_long_prompts_chunk(tmp_path):
    """`--batch 3 --prefill-len 24`: each traced step is 3 decodes beside 24 tokens of the long
    prompt, and the output says so (an H100 run at 248 requests traced decode-only steps and
    nothing told)."""
    out = _run_script(tmp_path, "--batch", "3", "--input-len", "20", "--prefill-len", "24")
    assert out["long_prompt_tokens_per_step"] == 24


def test_fresh_prompts_ride_beside_the_decodes(tmp_path):
    """`--batch 3 --fresh-prompts --prompts-per-step 3`: each traced step is 3 decodes beside
    3 fresh prompts (a served prompt step), every prompt admitted in its step: that needs
    3 + 2 x 3 seats, more than the 8 the decodes alone would get. No long prompt is made."""
    args = ["--batch", "3", "--input-len", "20", "--prefill-len", "12", "--fresh-prompts"]
    out = _run_script(tmp_path, *args, "--prompts-per-step", "3")
    assert out["prompts_per_step"] == 3
    assert out["waiting_after"] == 0
    assert out["long_prompt_tokens_per_step"] is None


def test_fresh_prompts_need_a_prefill_length(tmp_path):
    """`--fresh-prompts` alone would trace decode-only steps: refused by name."""
    import subprocess
    import sys

    argv = [sys.executable, str(SCRIPT), "--model", "m", "--out", "o", "--fresh-prompts"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--fresh-prompts needs --prefill-len" in proc.stderr


def test_the_newest_trace_of_a_reused_folder_is_summarised(tmp_path):
    """A profile folder used twice holds two traces; the summary must read the later one."""
    old = Path(_trace(tmp_path, 1))
    newer = tmp_path / "run2"
    newer.mkdir()
    new = Path(_trace(newer, 3))
    os.utime(old, (1_000, 1_000))  # the first run's file, whatever glob lists first
    assert trace_step.newest_trace(str(tmp_path)) == str(new)
    assert trace_step.newest_trace(str(tmp_path / "empty")) is None


def test_traced_steps_run_in_the_engines_power_of_two_buckets():
    """12 decodes + 1,024 prompt tokens run in the 2,048 bucket, as in the engine, not in a
    bucket of 1,036 (XLA pads unaligned matmul operands for cuBLAS: fusions the engine never
    runs); 16 tokens and 8 requests are the smallest rungs."""
    sizes = {n: trace_step.engine_bucket(n) for n in (0, 1, 16, 17, 64, 100, 1036, 2048)}
    assert sizes == {0: 16, 1: 16, 16: 16, 17: 32, 64: 64, 100: 128, 1036: 2048, 2048: 2048}
    requests = {n: trace_step.engine_bucket(n, 8) for n in (1, 8, 48, 65)}
    assert requests == {1: 8, 8: 8, 48: 64, 65: 128}
