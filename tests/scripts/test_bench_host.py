"""`scripts/bench_host.py`: its table, with the engine process's `send` column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "bench_host.py"


def test_engine_process_table_has_a_send_column_and_adds_up():
    args = ["--requests", "8", "--steps", "4", "--input-len", "16", "--engine-process"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, _, row = proc.stdout.strip().splitlines()
    assert [c.strip() for c in header.strip("|").split("|")][1:-1] == [
        "schedule", "build", "update", "outputs", "send",
    ]  # fmt: skip
    cells = [float(c) for c in row.strip("|").split("|")]
    assert cells[0] == 8 and all(c >= 0 for c in cells[1:])
    assert abs(sum(cells[1:-1]) - cells[-1]) <= 0.03  # rounded cells
