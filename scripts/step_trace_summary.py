"""Summarise a step trace (`PAGEJAX_STEP_TRACE=steps.jsonl pagejax serve|bench ...`) per token
bucket, as the tables of docs/BENCHMARKS.md: how many steps, their median period, host
milliseconds to schedule and dispatch, milliseconds waiting on the device, host milliseconds for
outputs, requests and prefill tokens.

A line's timings describe two steps (async scheduling): it schedules and dispatches step N + 1
(whose size it records) and then waits for step N. So the wait of the *next* line is the one
spent on this line's step, and that is what is attributed to its bucket. A step's period runs
from the previous step's completion to its own, as the host saw them (the end of each wait):
while the device is never idle, that is the step's device time.

    python scripts/step_trace_summary.py steps.jsonl [--idle-ms 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

COLUMNS = ("steps", "period_ms", "host_ms", "wait_ms", "outputs_ms", "requests", "prefill")


def summarize(lines: list[dict], idle_ms: float = 1000.0) -> dict[int, dict[str, float]]:
    """Per bucket: step count and the median of each column (see the module docstring).
    Steps followed by an idle gap longer than `idle_ms` (no next step yet) are left out."""

    def done(line: dict) -> float:  # when the host saw the step before this line's finish
        return line["t"] + (line["schedule_ms"] + line["dispatch_ms"] + line["wait_ms"]) / 1e3

    rows = defaultdict(list)
    for line, nxt in zip(lines, lines[1:], strict=False):
        if line["tokens"] == 0 or 1e3 * (nxt["t"] - line["t"]) > idle_ms:
            continue
        rows[line["bucket"]].append(
            (
                1e3 * (done(nxt) - done(line)),
                line["schedule_ms"] + line["dispatch_ms"],
                nxt["wait_ms"],
                nxt["outputs_ms"],
                line["requests"],
                line["prefill_tokens"],
            )
        )
    out = {}
    for bucket, values in sorted(rows.items()):
        medians = [statistics.median(column) for column in zip(*values, strict=True)]
        out[bucket] = {"steps": len(values), **dict(zip(COLUMNS[1:], medians, strict=True))}
    return out


def markdown(summary: dict[int, dict[str, float]]) -> str:
    head = "| bucket | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for bucket, row in summary.items():
        cells = [str(row["steps"])] + [f"{row[c]:.2f}" for c in COLUMNS[1:]]
        lines.append(f"| {bucket} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--idle-ms", type=float, default=1000.0)
    args = p.parse_args()
    lines = [json.loads(line) for line in args.trace.read_text().splitlines() if line.strip()]
    print(markdown(summarize(lines, args.idle_ms)))


if __name__ == "__main__":
    main()
