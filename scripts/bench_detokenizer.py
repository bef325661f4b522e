"""Host time of incremental detokenization for a batch of streams, one token each a step:
tokenizers' DecodeStream (the default where the tokenizer has a Rust backend) against the
two-window decode in Python (engine/detokenizer.py), alternated.

    python scripts/bench_detokenizer.py --requests 200 --output-json detok.json

Token ids come from encoding this repository's docs with the tokenizer (default: the embedded
model's), so the text is real; each request streams its own slice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from engine import detokenizer
from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from models.tokenizer import load_tokenizer

ROOT = Path(__file__).parents[1]


def ms_per_step(tokenizer, ids: list[int], requests: int, steps: int) -> float:
    stride = steps + 5
    detoks = [
        IncrementalDetokenizer(tokenizer, ids[i * stride : i * stride + 5], SamplingParams())
        for i in range(requests)
    ]
    start = time.perf_counter()
    for step in range(steps):
        for i, detok in enumerate(detoks):
            detok.update([ids[i * stride + 5 + step]])
            detok.get_output_text(finished=False, delta=True)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--tokenizer", default=None, help="folder or .gguf; default: embedded model")
    ap.add_argument("--output-json", required=True)
    args = ap.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    text = "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tokenizer.encode(text)
    if len(ids) < args.requests * (args.steps + 5):
        raise SystemExit(f"{len(ids)} tokens of text: too few for these --requests and --steps")
    stream = detokenizer._decode_stream
    paths = {"decode_stream": stream, "two_windows": lambda *a: None}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, make in paths.items():
            detokenizer._decode_stream = make
            times[name].append(ms_per_step(tokenizer, ids, args.requests, args.steps))
    detokenizer._decode_stream = stream
    result = {
        "requests": args.requests,
        "steps": args.steps,
        **{f"{name}_ms_per_step_median": statistics.median(v) for name, v in times.items()},
        "runs_ms_per_step": times,
    }
    print(json.dumps(result))
    Path(args.output_json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
