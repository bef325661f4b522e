"""`scripts/bench_detokenizer.py`: its JSON, both decode paths timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "bench_detokenizer.py"


def test_json_has_both_paths_and_every_run(tmp_path):
    out = tmp_path / "d.json"
    args = ["--requests", "4", "--steps", "5", "--reps", "2", "--output-json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 4 and result["steps"] == 5
    for path in ("decode_stream", "two_windows"):
        runs = result["runs_ms_per_step"][path]
        assert len(runs) == 2 and all(t > 0 for t in runs)
        assert min(runs) <= result[f"{path}_ms_per_step_median"] <= max(runs)
