"""`AsyncEngine.in_process`: the engine in a child process (what `pagejax serve` runs), driven
from a fresh interpreter, against transformers' greedy tokens. The server tests in tests/api
exercise it further (streams, aborts, a full queue, metrics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.hf_models import hf_greedy, write_checkpoint

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    from engine.async_engine import AsyncEngine
    from engine.sampling_params import SamplingParams


    async def run(engine, prompts):
        async def one(i, prompt):
            tokens = []
            params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
            async for out in engine.generate({"prompt_token_ids": prompt}, params, f"r{i}"):
                tokens += out.outputs[0].token_ids
                assert out.prompt_token_ids == prompt, "every delta carries its prompt"
            return tokens

        greedy = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        try:
            await anext(engine.generate([99999], SamplingParams(max_tokens=2)))
            bad = None
        except ValueError as e:
            bad = str(e)
        return greedy, bad


    if __name__ == "__main__":
        folder, prompts = sys.argv[1], json.loads(sys.argv[2])
        kwargs = dict(skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=32,
                      max_model_len=128, token_buckets=(16, 32), num_pages=64, page_size=8,
                      dtype="float32", compilation_cache_dir=None)
        engine = AsyncEngine.in_process(folder, kwargs)
        greedy, bad = asyncio.run(run(engine, prompts))
        stats = engine.stats()[0]
        engine.shutdown()
        from jax._src import xla_bridge
        print(json.dumps({
            "greedy": greedy, "bad": bad, "running": stats.num_running,
            "usage": stats.page_usage, "parent_backends": list(xla_bridge._backends),
        }))
    """
)


def test_engine_process_matches_transformers(tmp_path: Path) -> None:
    folder = write_checkpoint("llama3", tmp_path / "model")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (5, 17, 40)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), json.dumps(prompts)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[2],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["greedy"] == [hf_greedy(folder, p, 8) for p in prompts]
    assert "outside the vocabulary" in got["bad"]  # the child's ValueError, re-raised here
    assert got["running"] == 0 and got["usage"] == 0.0  # every page came back
    assert got["parent_backends"] == [], "the server process must leave the device alone"


DEATH_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys

    from engine.async_engine import AsyncEngine, EngineDeadError
    from engine.sampling_params import SamplingParams


    async def run(engine):
        params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        stream = engine.generate([5, 6, 7], params, "doomed")
        first = await anext(stream)
        # The engine process that runs it crashes (with two, the other lives on).
        os.kill(engine._cores[engine._owner["doomed"]]._process.pid, signal.SIGKILL)
        try:
            async for _ in stream:
                pass
            in_flight = "finished"
        except EngineDeadError:
            in_flight = "EngineDeadError"
        try:
            await anext(engine.generate([5], SamplingParams(max_tokens=2)))
            new = "accepted"
        except EngineDeadError:
            new = "EngineDeadError"
        return len(first.outputs[0].token_ids), in_flight, new


    if __name__ == "__main__":
        kwargs = dict(skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=32,
                      max_model_len=128, token_buckets=(16, 32), num_pages=64, page_size=8,
                      dtype="float32", compilation_cache_dir=None)
        engine = AsyncEngine.in_process(sys.argv[1], kwargs, data_parallel_size=int(sys.argv[2]))
        tokens, in_flight, new = asyncio.run(run(engine))
        print(json.dumps({"tokens": tokens, "in_flight": in_flight, "new": new,
                          "alive": engine.is_alive}))
        engine.shutdown()
    """
)


@pytest.mark.parametrize("data_parallel_size", [1, 2])
def test_engine_process_death_fails_requests_in_flight(tmp_path: Path, data_parallel_size):
    """A crashed engine process: the stream in flight and any new request raise
    EngineDeadError (the server answers 500 and /health 503) instead of hanging. With two
    data-parallel engines, one crash takes the whole engine down."""
    folder = write_checkpoint("llama3", tmp_path / "model")
    proc = subprocess.run(
        [sys.executable, "-c", DEATH_SCRIPT, str(folder), str(data_parallel_size)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=Path(__file__).parents[2],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"tokens": 1, "in_flight": "EngineDeadError", "new": "EngineDeadError",
                   "alive": False}  # fmt: skip
