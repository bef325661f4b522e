"""The server over raw HTTP (httpx): error statuses and bodies, auth, tokenize, metrics, start-up
logs, and what a client disconnect or a full waiting queue does to the engine."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.api.conftest import ALIAS, API_KEY, ENGINE_SETTINGS, MAX_WAITING, MODEL

MAX_LEN = ENGINE_SETTINGS["max_model_len"]


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as c:
        yield c


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return body["error"]


def _parse_metrics(text: str) -> dict[str, float]:
    """Samples without the model label (and this one-engine server's engine="0"):
    {'num_requests_running': 0.0, ...}."""
    out = {}
    for line in text.splitlines():
        m = re.match(
            r'pagejax:(\w+)\{(?:engine="0",)?(?:finished_reason="(\w+)",)?'
            r'model_name="[^"]+"\} (\S+)',
            line,
        )
        if m:
            out[m.group(1) + (f":{m.group(2)}" if m.group(2) else "")] = float(m.group(3))
    return out


def _metrics(http: httpx.Client) -> dict[str, float]:
    return _parse_metrics(http.get("/metrics").text)


def test_malformed_json_is_400(http):
    resp = http.post("/v1/completions", content=b"{not json", headers={"content-type": "x"})
    assert "not valid JSON" in _error(resp, 400)["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": -1}, None),
        ({"prompt": "hi", "top_p": 0}, None),
        ({"prompt": "hi", "n": "many"}, "n"),
        ({"prompt": "hi", "max_tokens": 0}, None),
        ({"prompt": "hi", "logprobs": 99}, None),
        ({"prompt": []}, "prompt"),
        ({"temperature": 1}, "prompt"),
        ({"prompt": [0, 49152]}, "prompt"),
        ({"prompt": "hi", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_invalid_completion_parameters_are_400(http, body, param):
    err = _error(http.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert err["type"] == "invalid_request_error"
    assert param is None or err["param"] == param


def test_json_schema_is_not_supported_yet(http):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    }
    err = _error(http.post("/v1/chat/completions", json=body), 400)
    assert "not supported yet" in err["message"]


def test_unknown_model_is_404(http):
    err = _error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]


def test_unknown_route_is_404(http):
    _error(http.get("/v1/nothing"), 404)


def test_prompt_past_max_model_len_is_400(http):
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * MAX_LEN})
    err = _error(resp, 400)
    assert str(MAX_LEN) in err["message"] and str(MAX_LEN) in err["message"]


def test_max_tokens_past_max_model_len_is_400(http):
    body = {"model": MODEL, "prompt": [5] * 10, "max_tokens": MAX_LEN}
    msg = _error(http.post("/v1/completions", json=body), 400)["message"]
    assert f"maximum context length is {MAX_LEN}" in msg
    assert f"{MAX_LEN + 10} tokens (10 in the prompt, {MAX_LEN} in the completion)" in msg


def test_auth_protects_v1_only(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as anon:
        assert _error(anon.get("/v1/models"), 401)["code"] == "invalid_api_key"
        bad = {"Authorization": "Bearer wrong"}
        _error(anon.post("/v1/completions", json={"prompt": "x"}, headers=bad), 401)
        assert anon.get("/health").status_code == 200
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert anon.get("/v1/models", headers=good).status_code == 200


def test_tokenize_detokenize_round_trip(http):
    tok = http.post("/tokenize", json={"model": ALIAS, "prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_LEN
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {
        "prompt": "Hello world"
    }
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > tok["count"]  # the chat template adds its role markers
    _error(http.post("/detokenize", json={"tokens": [-1]}), 400)


def test_version_and_startup_logs(http, server):
    assert http.get("/version").json()["version"]
    log = "".join(server.log)
    assert "compiling buckets" in log and "compiled" in log
    assert f"serving {MODEL}, {ALIAS} at {server.base_url}/v1" in log


def _long_request(i: int) -> dict:
    return {
        "model": MODEL,
        "prompt": f"request {i}",
        "max_tokens": MAX_LEN - 16,
        "ignore_eos": True,
        "stream": True,
    }


async def _open_streams(client: httpx.AsyncClient, num: int) -> list[asyncio.Task]:
    """Streams read until cancelled; a task ends early only with an error response."""

    async def one(i: int) -> httpx.Response:
        async with client.stream("POST", "/v1/completions", json=_long_request(i)) as resp:
            await resp.aread()
            return resp

    return [asyncio.create_task(one(i)) for i in range(num)]


async def _wait_for(
    client: httpx.AsyncClient, check, timeout: float = 60.0, poll: float = 0.1
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = _parse_metrics((await client.get("/metrics")).text)
        if check(metrics) or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(poll)


def test_full_queue_is_503_and_disconnect_frees_pages(server):
    """Fill the running batch and the waiting queue (more clients than both hold, so some get a
    503), then drop every client: the engine must abort them all (pages back to 0), not run them
    to completion."""
    num_seqs = ENGINE_SETTINGS["max_num_seqs"]

    async def scenario():
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=120
        ) as client:
            before = await _wait_for(client, lambda m: True)
            tasks = await _open_streams(client, num_seqs + MAX_WAITING + 8)
            # Wait for the state asserted below (the engine admits a burst only at its next
            # step), and for the first answer, which can only be a rejection.
            full = await _wait_for(
                client,
                lambda m: (
                    m["num_requests_waiting"] == MAX_WAITING
                    and m["num_requests_running"] == num_seqs
                ),
            )
            await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            rejected = [t.result() for t in tasks if t.done() and not t.exception()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            after = await _wait_for(
                client,
                lambda m: m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0,
            )
            return before, full, rejected, after

    before, full, rejected, after = asyncio.run(scenario())
    assert full["num_requests_waiting"] == MAX_WAITING, full
    assert full["num_requests_running"] == num_seqs and full["kv_cache_usage_perc"] > 0
    assert rejected, "no client was turned away"
    for resp in rejected:
        err = _error(resp, 503)
        assert resp.headers["retry-after"] == "1" and "overloaded" in err["message"]
    assert after["num_requests_running"] == 0 and after["num_requests_waiting"] == 0, after
    assert after["kv_cache_usage_perc"] == 0.0
    # Aborted, not finished: no request ran to its length limit.
    assert after.get("request_success_total:length") == before.get("request_success_total:length")


def test_non_streamed_disconnect_aborts(server, http):
    before = _metrics(http)
    body = {**_long_request(0), "stream": False}

    async def disconnect_while_running():
        # Drop the connection once the request runs: a fixed client timeout (1 s) raced the
        # engine, which can finish the 240 tokens inside it.
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=60
        ) as client:
            post = asyncio.create_task(client.post("/v1/completions", json=body))
            running = await _wait_for(client, lambda m: m["num_requests_running"] >= 1, poll=0.01)
            post.cancel()
            await asyncio.gather(post, return_exceptions=True)
            return running, post

    running, post = asyncio.run(disconnect_while_running())
    assert running["num_requests_running"] == 1 and post.cancelled(), "it finished first"
    deadline = time.monotonic() + 30
    while (m := _metrics(http))["num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m["num_requests_running"] == 0 and m["kv_cache_usage_perc"] == 0.0
    assert m.get("request_success_total:length") == before.get("request_success_total:length")


def test_metrics_names(http):
    text = http.get("/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "time_to_first_token_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
    ):
        assert f"pagejax:{name}" in text, name


def test_text_parts_equal_string_content(http):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    as_parts = http.post("/tokenize", json={"messages": [{"role": "user", "content": parts}]})
    as_text = http.post(
        "/tokenize", json={"messages": [{"role": "user", "content": "Hello\nthere"}]}
    )
    assert as_parts.json()["tokens"] == as_text.json()["tokens"]
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    _error(http.post("/v1/chat/completions", json={"model": MODEL, **bad}), 400)
