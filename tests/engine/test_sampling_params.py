"""SamplingParams: vLLM's defaults, normalisation and validation messages."""

from __future__ import annotations

import dataclasses

import pytest

from engine.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs, p.prompt_logprobs) == (
        16,
        0,
        None,
        None,
        None,
    )
    assert p.stop == () and p.stop_token_ids == () and p.logit_bias is None
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[5, 7]).stop_token_ids == (5, 7)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(logit_bias={"42": 3}).logit_bias == {42: 3.0}
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.1)
    assert greedy.is_greedy and (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert not SamplingParams(temperature=0.7).is_greedy


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be at least 1"),
        ({"temperature": -0.1}, "temperature must be non-negative"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be 0 or -1"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in"),
        ({"frequency_penalty": -2.5}, "frequency_penalty must be in"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero"),
        ({"logit_bias": {1: 101}}, r"logit_bias for token 1 must be in \[-100, 100\]"),
        ({"logit_bias": {"x": 1}}, "logit_bias must map token ids"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0"),
        ({"min_tokens": 17}, "min_tokens must be less than or equal to max_tokens"),
        ({"logprobs": MAX_LOGPROBS + 1}, r"logprobs must be in \[0, 20\]"),
        ({"prompt_logprobs": -1}, r"prompt_logprobs must be in \[0, 20\]"),
        ({"stop": ["ok", ""]}, "stop cannot contain an empty string"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_invalid_values_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_boundaries_accepted() -> None:
    SamplingParams(
        top_p=1.0,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        logprobs=0,
        prompt_logprobs=MAX_LOGPROBS,
        logit_bias={3: -100.0},
        max_tokens=None,
        min_tokens=1000,
        top_k=1,
    )
