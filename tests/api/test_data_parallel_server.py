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

from tests.api.conftest import API_KEY, MODEL, run_server, serve_command

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


HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": MODEL, "prompt": "x", "max_tokens": 240, "ignore_eos": True, "stream": True}


def _per_engine(text: str) -> dict[tuple[str, str], float]:
    """{(name, engine): value} of the engines' samples in a /metrics page."""
    out = {}
    for line in text.splitlines():
        m = re.match(r'pagejax:(\w+)\{engine="(\d+)",model_name="[^"]+"\} (\S+)', line)
        if m:
            out[m.group(1), m.group(2)] = float(m.group(3))
    return out


def _count(metrics: dict[tuple[str, str], float], name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


async def _stream(http: httpx.AsyncClient, body: dict) -> None:
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        await resp.aread()


async def _wait_for(http: httpx.AsyncClient, check) -> dict[tuple[str, str], float]:
    """The first /metrics snapshot that passes `check` (the last one after 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        m = _per_engine((await http.get("/metrics")).text)
        if check(m) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.01)


def test_two_engines_answer_as_one(dp_server, offline_llm):
    """With a long stream holding engine 0, the next requests go to engine 1 (the routing the
    next test checks); with it gone, to engine 0. Each engine answers as the one-device
    `LLM`."""
    from engine import SamplingParams

    assert any("2 data-parallel engine processes" in line for line in dp_server.log)
    want = offline_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16))
    want = want[0].outputs[0].text
    want_chat = offline_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))
    want_chat = want_chat[0].outputs[0].text
    assert want and want_chat

    async def scenario():
        url = dp_server.base_url + "/v1"
        async with (
            openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0) as client,
            httpx.AsyncClient(base_url=dp_server.base_url, headers=HEADERS, timeout=120) as http,
        ):

            async def answers():
                text = await client.completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0
                )
                chat = await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0
                )
                return text.choices[0].text, chat.choices[0].message.content

            hold = asyncio.create_task(_stream(http, LONG))
            busy = await _wait_for(http, lambda m: m.get(("num_requests_running", "0")) == 1)
            on_engine_1 = await answers()
            hold.cancel()
            await asyncio.gather(hold, return_exceptions=True)
            idle = await _wait_for(http, lambda m: _count(m, "num_requests_running") == 0)
            on_engine_0 = await answers()
            return busy, idle, on_engine_1, on_engine_0

    busy, idle, on_engine_1, on_engine_0 = asyncio.run(scenario())
    assert busy["num_requests_running", "0"] == 1 and busy["num_requests_running", "1"] == 0
    assert _count(idle, "num_requests_running") == 0
    assert on_engine_1 == on_engine_0 == (want, want_chat)


def test_concurrent_requests_spread_over_the_engines_and_aborts_free_both(dp_server):
    """Four long streams at once: two run on each engine. Dropping them aborts each on its own
    engine (both caches back to empty). Each engine traces its steps to a file of its own."""

    async def scenario():
        async with httpx.AsyncClient(
            base_url=dp_server.base_url, headers=HEADERS, timeout=120
        ) as http:
            before = await _wait_for(http, lambda m: True)
            tasks = [asyncio.create_task(_stream(http, LONG)) for _ in range(4)]
            full = await _wait_for(http, lambda m: _count(m, "num_requests_running") == 4)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            after = await _wait_for(
                http,
                lambda m: (
                    _count(m, "num_requests_running") + _count(m, "num_requests_waiting")
                    == _count(m, "kv_cache_usage_perc")
                    == 0
                ),
            )
            return before, full, after

    before, full, after = asyncio.run(scenario())
    assert full["num_requests_running", "0"] == 2 and full["num_requests_running", "1"] == 2, full
    assert full["kv_cache_usage_perc", "0"] > 0 and full["kv_cache_usage_perc", "1"] > 0
    for engine in "01":
        assert after["num_requests_running", engine] == 0, after
        assert after["kv_cache_usage_perc", engine] == 0.0, after
    # Aborted, each on its own engine, not run to the end.
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
