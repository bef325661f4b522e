"""`pagejax serve --tensor-parallel-size 2` (a real server on two CPU devices) through the
official `openai` client: its greedy completions and chats equal the offline `LLM` on one
device, token for token."""

from __future__ import annotations

import os

import openai
import pytest

from tests.api.conftest import API_KEY, MODEL, run_server, serve_command

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tp_server(model_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("xla_cache_tp")
    devices = "--xla_force_host_platform_device_count=2"
    env = {
        "PAGEJAX_API_KEY": API_KEY,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {devices}".strip(),
    }
    command = serve_command(model_dir, cache_dir) + ["--tensor-parallel-size", "2"]
    yield from run_server(command, env, model_dir, cache_dir)


@pytest.fixture(scope="module")
def client(tp_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tp_server.base_url + "/v1", api_key=API_KEY, max_retries=0)


def test_split_server_completes_as_one_device(tp_server, client, offline_llm):
    from engine import SamplingParams

    assert any("tensor parallel: split over 2 devices" in line for line in tp_server.log)

    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    want = offline_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16))
    assert got.choices[0].text == want[0].outputs[0].text != ""
    assert got.usage.completion_tokens == len(want[0].outputs[0].token_ids)


def test_split_server_chats_as_one_device(client, offline_llm):
    from engine import SamplingParams

    got = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0
    )
    want = offline_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))
    assert got.choices[0].message.content == want[0].outputs[0].text != ""
