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

With `--ttft RESULT.json` (a `pagejax bench serve --save-result` file of a run against the
traced server), it also splits each request's TTFT into stages. Client and engine stamp times
on the same clock (Linux's CLOCK_MONOTONIC, through `time.perf_counter` and
`time.monotonic`), and the trace names each prompt by its arrival time, so each send is
matched to the first unmatched arrival at or after it. This assumes requests reach the engine
in the order they were sent (one tokenizer thread, one pipe); two sends a few ms apart may
still swap, and a row with a negative stage shows it: such rows are counted and left out.
- `to_engine`: the send until the engine takes the request in (HTTP, tokenizing, the pipe,
  the rest of the engine loop's current turn);
- `queue`: until the engine schedules the step with the prompt's first chunk;
- `prompt`: until the step with its last chunk is back on the host (its steps, those in
  flight ahead of them, and the host's scheduling and dispatch of the step after it);
- `outputs`: the engine turning that step into outputs;
- `delivery`: until the client has the first chunk (the pipe to the server process, the event
  loop, the stream).
"""

from __future__ import annotations

import argparse
import json
import math
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


STAGES = ("to_engine", "queue", "prompt", "outputs", "delivery", "ttft")


def ttft_stages(lines: list[dict], result: dict) -> tuple[list[dict[str, float]], int]:
    """Per client request (in send order), its TTFT's stages in ms (see the module
    docstring), and how many matched rows had a negative stage (left out). Failed requests
    take their arrival out of the matching but give no row; so do requests whose steps the
    trace lacks."""
    first_step, last_step = {}, {}
    for i, line in enumerate(lines):
        for arrival in line.get("prompt_starts", ()):
            first_step.setdefault(arrival, i)
        for arrival in line.get("prompt_ends", ()):
            last_step.setdefault(arrival, i)
    arrivals = sorted(first_step)
    sends = sorted(zip(result["start_times"], result["ttfts"], strict=True))
    rows, swapped, j = [], 0, 0
    for send, ttft in sends:
        while j < len(arrivals) and arrivals[j] < send:
            j += 1  # an arrival before this send belongs to no later send either
        if j == len(arrivals):
            break
        arrival = arrivals[j]
        j += 1
        end = last_step.get(arrival)
        if not ttft or ttft < 0 or end is None or end + 1 >= len(lines):
            continue
        collect = lines[end + 1]  # the line that waits for the prompt's last step
        back = (
            collect["t"]
            + (collect["schedule_ms"] + collect["dispatch_ms"] + collect["wait_ms"]) / 1e3
        )
        made = back + collect["outputs_ms"] / 1e3
        start = lines[first_step[arrival]]["t"]
        stamps = (send, arrival, start, back, made, send + ttft)
        row = {k: 1e3 * (b - a) for k, a, b in zip(STAGES, stamps, stamps[1:], strict=False)}
        if min(row.values()) < 0:
            swapped += 1
            continue
        rows.append(row | {"ttft": 1e3 * ttft})
    return rows, swapped


def _rank(values: list[float], q: float) -> float:
    return values[max(0, math.ceil(q * len(values)) - 1)]


def ttft_table(rows: list[dict[str, float]]) -> str:
    """Median, p90 and p99 of each stage (p: the value at rank ceil(p / 100 * n))."""
    lines = [f"{len(rows)} requests", "| stage | median | p90 | p99 |", "| --- | --- | --- | --- |"]
    for stage in STAGES:
        values = sorted(r[stage] for r in rows)
        cells = (statistics.median(values), _rank(values, 0.9), _rank(values, 0.99))
        lines.append(f"| {stage} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--idle-ms", type=float, default=1000.0)
    p.add_argument("--ttft", type=Path, help="a bench serve result JSON: TTFT by stage")
    args = p.parse_args()
    lines = [json.loads(line) for line in args.trace.read_text().splitlines() if line.strip()]
    print(markdown(summarize(lines, args.idle_ms)))
    if args.ttft:
        rows, swapped = ttft_stages(lines, json.loads(args.ttft.read_text()))
        print()
        print(ttft_table(rows) if rows else "no request of the result is in the trace")
        if swapped:
            print(
                f"{swapped} requests left out: a negative stage (they reached the engine "
                "in another order than sent)"
            )


if __name__ == "__main__":
    main()
