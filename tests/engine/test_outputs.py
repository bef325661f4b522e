"""vLLM-shaped logprob dicts built from the runner's TokenLogprobs."""

from __future__ import annotations

from engine.outputs import CompletionOutput, Logprob, to_logprob_dict
from engine.types import TokenLogprobs


def test_sampled_token_outside_top_k_comes_first() -> None:
    entry = TokenLogprobs(7, -3.0, 5, top_token_ids=(1, 2), top_logprobs=(-0.1, -0.5))
    got = to_logprob_dict(entry, decode=lambda t: f"<{t}>")
    assert list(got) == [7, 1, 2]
    assert got[7] == Logprob(-3.0, 5, "<7>")
    assert got[2] == Logprob(-0.5, 2, "<2>")


def test_sampled_token_inside_top_k_is_not_repeated() -> None:
    entry = TokenLogprobs(2, -0.5, 2, top_token_ids=(1, 2), top_logprobs=(-0.1, -0.5))
    got = to_logprob_dict(entry, decode=str)
    assert got == {2: Logprob(-0.5, 2, "2"), 1: Logprob(-0.1, 1, "1")}


def test_completion_finished_is_a_method() -> None:
    out = CompletionOutput(0, "hi", [5], None, None)
    assert not out.finished()
    assert CompletionOutput(0, "hi", [5], None, None, finish_reason="length").finished()
