"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers loading the
same file with `gguf_file=`."""

from __future__ import annotations

import numpy as np
import pytest

from models.default_model import default_model_path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def hf_model():
    import torch
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.generation_config.eos_token_id = None  # like ignore_eos: neither stop nor suppress EOS
    return model.eval(), tok


def test_logits_match_transformers(hf_model):
    import torch

    from models.loader import load_model
    from tests.hf_models import empty_caches
    from tests.models.test_llama import PAGE_SIZE, _run

    model, tok = hf_model
    ids = tok.encode(PROMPTS[2])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = load_model(None, dtype="float32")
    logits, _ = _run(ours, empty_caches(ours, 13, PAGE_SIZE), ids, 0)
    rel = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"


def test_greedy_continuations_match_transformers(hf_model, tmp_path):
    import torch

    from engine import LLM, SamplingParams

    model, tok = hf_model
    llm = LLM(
        dtype="float32",
        max_num_seqs=4,
        max_num_batched_tokens=64,
        token_buckets=(16, 64),
        max_model_len=256,
        compilation_cache_dir=str(tmp_path),
    )
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([ids]),
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        assert out.outputs[0].token_ids == ref[0, len(ids) :].tolist(), prompt
        assert out.outputs[0].text == tok.decode(ref[0, len(ids) :], skip_special_tokens=True)
