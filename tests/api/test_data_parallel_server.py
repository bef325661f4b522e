"""`pagejax serve --data-parallel-size 2`: two engine processes behind one real server (uvicorn,
127.0.0.1, CPU). Its greedy answers equal the offline `LLM`'s through the official `openai`
client; concurrent requests spread over both engines, and dropping them frees both caches."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from tests.api.conftest import API_KEY, ENGINE_SETTINGS, MODEL, run_server, serve_command

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def dp_server(model_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("xla_cache_dp")
    trace = tmp_path_factory.mktemp("trace") / "steps.jsonl"
    env = {"PAGEJAX_API_KEY": API_KEY, "JAX_PLATFORMS": "cpu", "PAGEJAX_STEP_TRACE": str(trace)}
    command = serve_command(model_dir, cache_dir) + ["--data-parallel-size", "2"]
    for server in run_server(command, env, model_dir, cache_dir):
        server.trace = trace
        yield server


@pytest.fixture(scope="module")
def client(dp_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dp_server.base_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(model_dir):
    from engine import LLM

    return LLM(str(model_dir), compilation_cache_dir=None, **ENGINE_SETTINGS)


def test_two_engines_answer_as_one(dp_server, client, offline):
    from engine import SamplingParams

    assert any("2 data-parallel engine processes" in line for line in dp_server.log)
    for _ in range(2):  # the first goes to engine 0; done by then, the second goes there too
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
        want = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16))
        assert got.choices[0].text == want[0].outputs[0].text != ""
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0
    )
    want = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))
    assert chat.choices[0].message.content == want[0].outputs[0].text != ""


def _per_engine(text: str) -> dict[tuple[str, str], float]:
    """{(name, engine): value} of the engines' gauges in a /metrics page, and ("finished
    length", "") for the requests that ran to their length limit."""
    out = {("finished length", ""): 0.0}
    for line in text.splitlines():
        m = re.match(r'pagejax:(\w+)\{engine="(\d+)",model_name="[^"]+"\} (\S+)', line)
        if m:
            out[m.group(1), m.group(2)] = float(m.group(3))
        m = re.match(r'pagejax:request_success_total\{finished_reason="length",\S+ (\S+)', line)
        if m:
            out["finished length", ""] = float(m.group(1))
    return out


def _count(metrics: dict[tuple[str, str], float], name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def test_concurrent_requests_spread_over_the_engines_and_aborts_free_both(dp_server):
    """Four long streams at once: two run on each engine. Dropping them aborts each on its own
    engine (both caches back to empty). Each engine traces its steps to a file of its own."""
    long = {"model": MODEL, "prompt": "x", "max_tokens": 240, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def scenario():
        async with httpx.AsyncClient(
            base_url=dp_server.base_url, headers=headers, timeout=120
        ) as http:

            async def one():
                async with http.stream("POST", "/v1/completions", json=long) as resp:
                    await resp.aread()

            async def wait_for(check):
                deadline = time.monotonic() + 60
                while True:
                    m = _per_engine((await http.get("/metrics")).text)
                    if check(m) or time.monotonic() > deadline:
                        return m
                    await asyncio.sleep(0.01)

            before = await wait_for(lambda m: True)
            tasks = [asyncio.create_task(one()) for _ in range(4)]
            full = await wait_for(lambda m: _count(m, "num_requests_running") == 4)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            after = await wait_for(
                lambda m: (
                    _count(m, "num_requests_running") + _count(m, "num_requests_waiting")
                    == _count(m, "kv_cache_usage_perc")
                    == 0
                )
            )
            return before, full, after

    before, full, after = asyncio.run(scenario())
    assert full["num_requests_running", "0"] == 2 and full["num_requests_running", "1"] == 2, full
    assert full["kv_cache_usage_perc", "0"] > 0 and full["kv_cache_usage_perc", "1"] > 0
    for engine in "01":
        assert after["num_requests_running", engine] == 0, after
        assert after["kv_cache_usage_perc", engine] == 0.0, after
    # Aborted, each on its own engine, not run to the end.
    assert after["finished length", ""] == before["finished length", ""]
    for engine in "01":
        aborted = "num_requests_aborted_total", engine
        assert after[aborted] - before[aborted] == 2, (before, after)
    # Each engine opened a step trace of its own (its lines are flushed when it idles).
    assert not dp_server.trace.exists()
    assert dp_server.trace.with_name("steps.dp0.jsonl").exists()
    assert dp_server.trace.with_name("steps.dp1.jsonl").exists()


def test_data_parallel_size_below_one_is_refused(model_dir):
    from api.cli import main

    assert main(["serve", str(model_dir), "--data-parallel-size", "0"]) == 2
