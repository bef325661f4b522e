"""Incremental detokenization against a real byte-level BPE tokenizer built offline."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine import detokenizer
from engine.detokenizer import IncrementalDetokenizer, find_stop_string, partial_stop_len
from engine.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Stop strings may be split across tokens, like the word stopping.",
    "Emoji such as 😀 and 🚀, and CJK like 你好世界 take several bytes each.",
]
TEXTS = [
    "Hello world, the fox is quick.",
    "你好世界! 😀🚀 mixed with ASCII and ünïcödé",
    "Unseen characters: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 漢字 and 🧪🧬",
]


@pytest.fixture(autouse=True, params=["decode_stream", "two_windows"])
def decode_path(request, monkeypatch) -> str:
    """Every test runs on both paths: the tokenizers library's DecodeStream (one Rust call a
    token, used where the tokenizer has a Rust backend) and the two-window decode in Python
    that serves the other tokenizers."""
    if request.param == "two_windows":
        monkeypatch.setattr(detokenizer, "_decode_stream", lambda *args: None)
    return request.param


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style): multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def stream(
    detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1, stop_terminated: bool = False
) -> list[str]:
    """Feed ids `chunk` at a time; returns the streamed deltas (last one with finished=True)."""
    deltas = []
    for i in range(0, len(ids), chunk):
        last = i + chunk >= len(ids)
        stop = detok.update(ids[i : i + chunk], stop_terminated and last)
        deltas.append(detok.get_output_text(finished=last or stop is not None, delta=True))
        if stop is not None:
            break
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_equals_full_decode(
    tokenizer: PreTrainedTokenizerFast, text: str, chunk: int, decode_path: str
) -> None:
    prompt = tokenizer.encode("The quick brown fox")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    assert (detok._step is not None) == (decode_path == "decode_stream")
    deltas = stream(detok, ids, chunk)
    assert "".join(deltas) == text == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    assert detok.output_text == text and detok.token_ids == ids


def test_multibyte_characters_span_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("🧪")
    assert len(ids) > 1  # four bytes, never merged: the test needs a character split
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    assert stream(detok, ids) == [""] * (len(ids) - 1) + ["🧪"]


def test_stop_string_split_across_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "Hello world, the lazy dog jumps."
    stop = "zy do"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert all(stop not in p for p in pieces)  # no single token holds it
    params = SamplingParams(stop=[stop, "never"])
    detok = IncrementalDetokenizer(tokenizer, [], params)
    deltas = stream(detok, ids)
    assert detok.stop_string == stop
    assert detok.output_text == "Hello world, the la"
    assert "".join(deltas) == "Hello world, the la"
    assert all("z" not in d for d in deltas)  # the start of the stop was held back


def test_include_stop_str_in_output(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("Hello world, the lazy dog jumps.")
    params = SamplingParams(stop="lazy", include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    assert "".join(stream(detok, ids)) == "Hello world, the lazy"


def test_held_back_text_released_when_no_stop(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("the fox is quick")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="fox jumps"))
    deltas = stream(detok, ids)
    assert detok.stop_string is None
    assert "".join(deltas) == "the fox is quick"
    stop = "fox jumps"
    for i in range(1, len(deltas)):
        sent = "".join(deltas[:i])
        assert not any(sent.endswith(stop[:k]) for k in range(1, len(stop))), sent
    assert any("fox" in d for d in deltas[:-1]), "released once it cannot be the stop"


def test_stop_terminated_token_text_left_out(tokenizer: PreTrainedTokenizerFast) -> None:
    stop_id = tokenizer.encode("!")[0]
    ids = tokenizer.encode("Hello") + [stop_id]
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop_token_ids=[stop_id]))
    assert "".join(stream(detok, ids, stop_terminated=True)) == "Hello"
    detok = IncrementalDetokenizer(
        tokenizer, [], SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=True)
    )
    assert "".join(stream(detok, ids, stop_terminated=True)) == "Hello!"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer: PreTrainedTokenizerFast, skip: bool) -> None:
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("Hello") + [eos] + tokenizer.encode(" world")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=skip))
    want = "Hello world" if skip else "Hello<eos> world"
    assert "".join(stream(detok, ids)) == want


def test_stop_strings_ignored_before_min_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("fox fox fox")
    params = SamplingParams(stop="fox", min_tokens=len(tokenizer.encode("fox fox")))
    detok = IncrementalDetokenizer(tokenizer, [], params)
    stream(detok, ids)
    assert detok.stop_string == "fox" and detok.output_text == "fox fox "


def test_find_stop_string_earliest_in_new_text() -> None:
    assert find_stop_string("abcdef", 2, ["ef", "cde"], False) == ("cde", 2)
    assert find_stop_string("abcdef", 2, ["ef"], True) == ("ef", 6)
    assert find_stop_string("abcdef", 1, ["bc"], False) is None  # old match, not re-checked


def test_partial_stop_len() -> None:
    assert partial_stop_len("hello wor", ["world", "word up"]) == 3
    assert partial_stop_len("hello", ["xyz"]) == 0
    assert partial_stop_len("ab", ["abc", "b"]) == 2


def test_leading_space_kept_after_prompt_with_metaspace() -> None:
    """SentencePiece-style decoders strip the space of a text's first word: the prompt context
    must keep the first output word's space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    prompt, whole = hf.encode("Hello world"), hf.encode("Hello world the quick fox")
    assert whole[: len(prompt)] == prompt
    ids = whole[len(prompt) :]
    assert hf.decode(ids).startswith("the")  # decoded alone, the space is lost
    full = hf.decode(prompt + ids)
    detok = IncrementalDetokenizer(hf, prompt, SamplingParams())
    assert "".join(stream(detok, ids)) == full[len(hf.decode(prompt)) :] == " the quick fox"


def test_both_paths_agree_on_the_embedded_model_tokenizer(decode_path: str) -> None:
    """SmolLM2's byte-level BPE (the default model), random ids with special tokens among them:
    the streamed text equals the whole decode, whichever path ran."""
    import numpy as np

    from models.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, tok.vocab_size, 7).tolist()
    ids = rng.integers(0, tok.vocab_size, 300).tolist()
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt, SamplingParams(skip_special_tokens=skip))
        assert (detok._step is not None) == (decode_path == "decode_stream")
        text = "".join(stream(detok, ids, chunk=2))
        context = tok.decode(prompt[-5:], skip_special_tokens=skip)
        whole = tok.decode(prompt[-5:] + ids, skip_special_tokens=skip)
        assert text == whole[len(context) :]
