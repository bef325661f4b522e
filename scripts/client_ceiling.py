"""How fast `pagejax bench serve` itself can go: its ceiling, with no engine behind it.

Starts a stub OpenAI-compatible server in its own process that streams every open completion
one chunk per `--period-ms` tick (all streams on the same tick, as an engine step does), runs
`pagejax bench serve` against it at an infinite request rate, and prints JSON: the client's
duration against the stub's pace (`ideal_s`: the last request's tokens at one a tick), the
chunks it timed (and how many a second), and the CPU seconds the client and the stub used.
A client that keeps up has `duration_s` close to `ideal_s`. When it does not, either side may be
the limit (the stub is one Python process too: compare their CPU seconds), so the chunk rate is
a lower bound on what the client can take.

    python scripts/client_ceiling.py --num-prompts 200 --output-len 128 --period-ms 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def stub_app(period_s: float):
    """The stub: a shared ticker; each stream sends a chunk a tick, then usage and [DONE]."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    tick = {"event": None}

    async def ticker() -> None:
        # On absolute deadlines: a loaded event loop ticks late, not ever later.
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += period_s
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            tick["event"].set()
            tick["event"] = asyncio.Event()

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def completions(request):
        body = await request.json()
        if tick["event"] is None:
            tick["event"] = asyncio.Event()
            asyncio.get_running_loop().create_task(ticker())

        async def events():
            for i in range(body["max_tokens"]):
                await tick["event"].wait()
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f" t{i}"}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes)


def serve_stub(port: int, period_s: float) -> None:
    import uvicorn

    uvicorn.run(stub_app(period_s), host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--period-ms", type=float, default=15.0)
    ap.add_argument("--stub-port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stub_port is not None:  # the child: be the stub
        serve_stub(args.stub_port, args.period_ms / 1e3)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = [sys.executable, __file__, "--stub-port", str(port), "--period-ms", str(args.period_ms)]
    stub = subprocess.Popen(child)
    try:
        from api.cli import main as cli

        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "r.json"
            deadline = time.monotonic() + 30
            while True:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline or stub.poll() is not None:
                    raise SystemExit("the stub server did not start")
                time.sleep(0.05)
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            cli(
                [
                    "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                    "--model", "stub", "--random-input-len", str(args.input_len),
                    "--random-output-len", str(args.output_len),
                    "--num-prompts", str(args.num_prompts), "--ignore-eos",
                    "--disable-tqdm", "--save-result", "--result-filename", str(result),
                ]
            )  # fmt: skip
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            r = json.loads(result.read_text())
    finally:
        stub.terminate()
        stub.wait(10)
    stub_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    ideal = args.output_len * args.period_ms / 1e3
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    # What the client timed: the first chunk and every gap after it, of the requests that got one.
    chunks = sum(len(itl) + 1 for itl, ttft in zip(r["itls"], r["ttfts"], strict=True) if ttft)
    out = {
        "num_prompts": args.num_prompts,
        "output_len": args.output_len,
        "period_ms": args.period_ms,
        "ideal_s": round(ideal, 3),
        "duration_s": round(r["duration"], 3),
        "chunks": chunks,
        "chunks_per_s": round(chunks / r["duration"], 1),
        "client_cpu_s": round(cpu, 3),  # the benchmark's run, after imports
        "stub_cpu_s": round(stub_cpu.ru_utime + stub_cpu.ru_stime, 3),
        "median_tpot_ms": round(r["median_tpot_ms"], 3),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
