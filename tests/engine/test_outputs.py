"""vLLM-shaped logprob dicts built from the runner's TokenLogprobs, which outputs the output
processor returns for each `OutputKind`, and how outputs cross the engine process's pipe."""

from __future__ import annotations

import dataclasses
import pickle
from multiprocessing.reduction import ForkingPickler

from engine.output_processor import OutputProcessor
from engine.outputs import CompletionOutput, Logprob, OutputKind, RequestOutput, to_logprob_dict
from engine.sampling_params import SamplingParams
from engine.types import RequestUpdate, TokenLogprobs


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


def test_final_only_returns_each_request_once_when_all_its_completions_finish() -> None:
    """FINAL_ONLY (what `LLM.generate` asks for) builds no output for a running request, and the
    one it returns at the end equals the cumulative output of the same step."""
    steps = [  # per step: (completion id, token, finished) updates
        [("a", 5, False), ("0_b", 6, False), ("1_b", 7, False)],
        [("a", 8, True), ("0_b", 9, True), ("1_b", 10, False)],
        [("1_b", 11, True)],
    ]
    processors = {kind: OutputProcessor(None) for kind in OutputKind}
    for proc in processors.values():
        proc.add_request("a", None, [1, 2], SamplingParams(max_tokens=2))
        proc.add_request("b", None, [3], SamplingParams(n=2, max_tokens=3))
    seen = []
    for step in steps:
        updates = [
            RequestUpdate(cid, (t,), done, "length" if done else None) for cid, t, done in step
        ]
        final, _ = processors[OutputKind.FINAL_ONLY].process(updates, kind=OutputKind.FINAL_ONLY)
        full, _ = processors[OutputKind.CUMULATIVE].process(updates, kind=OutputKind.CUMULATIVE)
        assert final == [out for out in full if out.finished]
        seen += [out.request_id for out in final]
    assert seen == ["a", "b"]


def test_outputs_pickle_and_load_equal() -> None:
    """They cross the engine process's pipe pickled; loaded, they equal the original, and
    `with_prompt` (how the server puts a prompt back) equals `dataclasses.replace`."""
    logprobs = [{7: Logprob(-0.25, 1, "x"), 3: Logprob(-2.0, 2, None)}]
    comps = [
        CompletionOutput(0, "a b", [7], -0.25, logprobs, "stop", "\n"),
        CompletionOutput(1, "", [], None, None),
    ]
    out = RequestOutput("r", "hi", [1, 2], [None, logprobs[0]], comps, True, 3)
    loaded = pickle.loads(ForkingPickler.dumps(out))
    assert loaded == out and type(loaded.outputs[0]) is CompletionOutput
    bare = dataclasses.replace(out, prompt=None, prompt_token_ids=None)
    assert out.with_prompt(None, None) == bare and bare.with_prompt("hi", [1, 2]) == out


def test_prompt_once_sends_each_prompt_with_the_first_output_only() -> None:
    """As the engine process runs it: the first delta of a request carries its prompt, later
    ones and a later abort carry None; a request aborted before any output still gets it."""
    proc = OutputProcessor(None, prompt_once=True)
    for rid in ("a", "b"):
        proc.add_request(rid, f"text {rid}", [1, 2], SamplingParams(max_tokens=5))
    first, _ = proc.process([RequestUpdate("a", (5,))], kind=OutputKind.DELTA)
    second, _ = proc.process([RequestUpdate("a", (6,))], kind=OutputKind.DELTA)
    assert (first[0].prompt, first[0].prompt_token_ids) == ("text a", [1, 2])
    assert (second[0].prompt, second[0].prompt_token_ids) == (None, None)
    assert second[0].outputs[0].token_ids == [6]
    assert proc.abort("a").prompt_token_ids is None
    assert proc.abort("b").prompt_token_ids == [1, 2]
    plain = OutputProcessor(None)  # in-process engines: every output carries it
    plain.add_request("c", "text c", [4], SamplingParams(max_tokens=5))
    for t in (5, 6):
        (out,), _ = plain.process([RequestUpdate("c", (t,))], kind=OutputKind.DELTA)
        assert out.prompt_token_ids == [4]
