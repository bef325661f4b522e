"""`scripts/synthetic_tokenizer.py`: N random ids are N words and come back as the same N ids,
through transformers' loader and the detokenizer's streaming decode."""

from __future__ import annotations

import json

import numpy as np

from tests.scripts import load_script

synthetic_tokenizer = load_script("synthetic_tokenizer")


def test_random_ids_round_trip_as_words(tmp_path):
    from tokenizers.decoders import DecodeStream
    from transformers import AutoTokenizer

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({"vocab_size": 128256}))
    folder = synthetic_tokenizer.write(config_dir, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 128256
    assert tok.eos_token_id == 128009 and tok.bos_token_id == 128000
    ids = np.random.default_rng(0).integers(1, 128000, 300).tolist()
    text = tok.decode(ids)
    assert len(text.split()) == 300
    assert tok.encode(text, add_special_tokens=False) == ids
    stream = DecodeStream(skip_special_tokens=False)
    assert "".join(stream.step(tok._tokenizer, i) or "" for i in ids) == text


def test_small_vocabulary_leaves_out_the_special_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    tok_dir = synthetic_tokenizer.write(tmp_path, tmp_path / "model")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert "eos_token" not in config
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 1000 and vocab["w999"] == 999
