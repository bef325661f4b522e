"""The server through the official `openai` client: its parsing is the independent check of every
response shape; outputs are checked against the offline `LLM` API and against each other."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.api.conftest import ALIAS, API_KEY, ENGINE_SETTINGS, MODEL

PROMPT = "The capital of France is"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(server):
    """The offline API on the same checkpoint and settings (its compiled buckets come from the
    server's persistent compilation cache)."""
    from engine import LLM

    return LLM(
        str(server.model_dir),
        compilation_cache_dir=str(server.compilation_cache_dir),
        **ENGINE_SETTINGS,
    )


def test_models_reports_first_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_offline_llm(client, offline):
    from engine import SamplingParams

    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, n=2, seed=7, temperature=1.0
    )
    want = offline.generate(PROMPT, SamplingParams(n=2, seed=7, temperature=1.0, max_tokens=12))
    assert [c.text for c in got.choices] == [c.text for c in want[0].outputs]
    assert got.usage.prompt_tokens == len(want[0].prompt_token_ids)
    assert got.usage.completion_tokens == sum(len(c.token_ids) for c in want[0].outputs)


def test_chat_equals_offline_llm(client, offline):
    from engine import SamplingParams

    got = client.chat.completions.create(
        model=ALIAS, messages=MESSAGES, max_completion_tokens=10, seed=3, temperature=0.8
    )
    want = offline.chat(MESSAGES, SamplingParams(seed=3, temperature=0.8, max_tokens=10))
    assert got.model == ALIAS
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want[0].outputs[0].text
    assert got.usage.prompt_tokens == len(want[0].prompt_token_ids)


def _collect_completion_stream(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            assert not chunk.choices, "the usage chunk comes last, with no choices"
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def test_completion_stream_equals_non_stream(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, n=3, seed=11, temperature=1.0)
    whole = client.completions.create(**kw)
    stream = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = _collect_completion_stream(stream)
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage
    assert len({c.text for c in whole.choices}) > 1, "n seeded completions should differ"


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, seed=5, temperature=1.0, n=2)
    whole = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    texts: dict[int, str] = {}
    roles, usage = set(), None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            roles.add(c.delta.role)
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert "assistant" in roles
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert usage == whole.usage


def test_seeded_n_is_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, n=3, seed=1234, temperature=1.0)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]


def test_completion_logprobs_shape(client):
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    lp = got.choices[0].logprobs
    n = got.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4  # the top 3, plus the sampled token when it is not among them
        assert logprob == pytest.approx(max(top.values()))  # greedy: the sampled token is top-1
        assert top[token] == logprob


def test_echo_with_logprobs_includes_the_prompt(client):
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True
    )
    c = got.choices[0]
    assert c.text.startswith(PROMPT)
    num_prompt = got.usage.prompt_tokens
    assert len(c.logprobs.tokens) == num_prompt + got.usage.completion_tokens
    assert c.logprobs.token_logprobs[0] is None  # the first prompt token has no logprob
    assert all(x is not None for x in c.logprobs.token_logprobs[1:])


def test_chat_logprobs_shape(client):
    got = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    assert "".join(t.token for t in content) == got.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.bytes == list(t.token.encode())


def test_stop_string_ends_the_completion(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    got = client.completions.create(**kw, stop=[stop]).choices[0]
    assert got.text == full[: full.index(stop)]
    assert got.finish_reason == "stop"


def test_several_prompts_and_token_ids(client):
    ids = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    got = client.completions.create(
        model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.choices[0].text == got.choices[1].text  # greedy: both completions agree
    assert got.choices[0].text != got.choices[2].text
    token_prompt = [1, 504, 3458, 282]
    by_ids = client.completions.create(model=MODEL, prompt=token_prompt, max_tokens=2)
    assert by_ids.usage.prompt_tokens == len(token_prompt)
    assert ids > 0


def test_length_finish_reason_and_usage(client):
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 5
    assert got.usage.total_tokens == got.usage.prompt_tokens + 5


def test_32_concurrent_streams_complete(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, int]:
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"{PROMPT} {i}",
            max_tokens=8,
            temperature=1.0,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, reason, tokens = "", None, 0
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, reason, tokens

    async def run_all():
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run_all())
    assert [(r[1], r[2]) for r in results] == [("length", 8)] * 32
    assert all(r[0] for r in results)
