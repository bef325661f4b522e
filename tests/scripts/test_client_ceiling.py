"""`scripts/client_ceiling.py`: the bench client against its paced stub server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "client_ceiling.py"


def test_the_client_takes_every_chunk_no_faster_than_the_stub_paces_them():
    """8 streams of 5 tokens at one chunk per 20 ms tick: the run cannot end before the 5th
    tick (the first may come up to a period after the stub starts ticking, so 4 periods are
    sure), and every chunk of every stream arrives."""
    args = ["--num-prompts", "8", "--output-len", "5", "--input-len", "16", "--period-ms", "20"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ideal_s"] == 0.1
    assert out["duration_s"] >= out["ideal_s"] - 0.02
    assert out["chunks"] == 8 * 5
