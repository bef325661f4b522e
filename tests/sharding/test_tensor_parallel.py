"""Tensor parallelism (`tensor_parallel_size=2`): the engine on two CPU devices against
transformers' greedy tokens and logprobs, for each family's parameters (biases, tied
embeddings, q/k norms), the Pallas kernels (interpreted) and an Orbax checkpoint; the KV cache
and weights split as DESIGN.md's Parallelism section says. The two-device runs happen in one
child process (tp_worker.py): jax fixes its device count when it starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.config import ModelConfig
from models.layout import arrange_param, shard_columns
from tests.hf_models import FAMILIES, hf_greedy, hf_logits, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
CASES = {  # job name -> (family, checkpoint overrides, attention backend, orbax, cached)
    # Two engines on one executable cache: the second loads the first's split executables.
    # First in the worker's process: on the CPU, jaxlib cannot serialize an executable whose
    # sort comparator an earlier compile of the process made ("`LessThan` is not
    # serializable"), and the cache then stores all but that one.
    "cached": ("mistral", {}, "reference", False, True),
    "cached_again": ("mistral", {}, "reference", False, True),
    "llama3": ("llama3", {}, "reference", False, False),
    "qwen2": ("qwen2", {}, "reference", False, False),
    "qwen3": ("qwen3", {}, "reference", False, False),
    # Every bias: q/k/v's and gate/up's split; o_proj's and down_proj's added once, after the
    # sum over shards.
    "biases": ("llama_biases", {}, "reference", False, False),
    # Heads of 16 and 128 MLP columns a shard: the fused decode matmuls, qkv's epilogue too.
    "fused": (
        "llama3",
        {"head_dim": 16, "intermediate_size": 256},
        "pallas-interpret-gpu",
        False,
        False,
    ),
    "tpu": ("llama3", {}, "pallas-interpret-tpu", False, False),
    "orbax": ("llama3", {}, "reference", True, False),
}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(3, 320, size=n).tolist() for n in (5, 30, 45)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prompts):
    """Each case's checkpoint folder and what the two-device engine made of it."""
    root = tmp_path_factory.mktemp("tp")
    folders, jobs = {}, []
    for name, (family, overrides, backend, orbax, cached) in CASES.items():
        folders[name] = write_checkpoint(family, root / name, **overrides)
        job = dict(name=name, folder=str(folders[name]), tp=2, backend=backend, prompts=prompts)
        if orbax:
            job["orbax_dir"] = str(root / f"{name}_orbax")
        if cached:
            job["cache_dir"] = str(root / "executables")
        jobs.append(job)
    for tp in (3, 1):  # the embedded GGUF model: 9 heads and 3 KV heads, split three ways
        jobs.append(dict(name=f"gguf_tp{tp}", folder=None, tp=tp, prompts=prompts))
    (root / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "tests.sharding.tp_worker", root / "jobs.json", root / "out.json"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads((root / "out.json").read_text())
    return {name: (folders.get(name), run) for name, run in out.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_matches_transformers(runs, prompts, name):
    """Greedy tokens, and the logprob of every prompt and generated token, as transformers'
    one-device float32 model gives them."""
    import torch

    folder, run = runs[name]
    for i, prompt in enumerate(prompts):
        tokens = run["tokens"][i]
        assert tokens == hf_greedy(folder, prompt, len(tokens))
        ref = torch.log_softmax(torch.tensor(hf_logits(folder, prompt + tokens)), -1).numpy()
        want_prompt = [ref[p - 1][prompt[p]] for p in range(1, len(prompt))]
        want_tokens = [ref[len(prompt) - 1 + j][t] for j, t in enumerate(tokens)]
        np.testing.assert_allclose(run["prompt_logprobs"][i], want_prompt, atol=1e-4)
        np.testing.assert_allclose(run["token_logprobs"][i], want_tokens, atol=1e-4)


def test_gguf_model_split_three_ways_matches_one_device(runs):
    """The embedded default model (GGUF, Q4_1, tied embeddings) on three devices: its fused
    columns regrouped from GGUF's tensors for three shards of 3 q heads and 1 KV head; the
    same tokens and logprobs as on one device, and the same seeded samples with logit bias,
    a repetition penalty and min_tokens (rows the launcher thread writes before the step)."""
    split, whole = runs["gguf_tp3"][1], runs["gguf_tp1"][1]
    assert split["kv_shard_shape"][1] == 1 and whole["kv_shape"][1] == 3
    assert split["tokens"] == whole["tokens"]
    assert split["biased_tokens"] == whole["biased_tokens"]  # rows written before their step
    for key in ("prompt_logprobs", "token_logprobs"):
        for got, want in zip(split[key], whole[key], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4)


def test_fused_decode_layers_ran_split(runs):
    """The "fused" case ran its decode-sized steps on the fused matmuls (qkv's epilogue
    writing each shard's KV heads), not on XLA's."""
    assert runs["fused"][1]["fused_qkv_calls"] > 0
    assert runs["llama3"][1]["matmul_calls"] == 0  # the jnp backend: never fused


def test_cache_and_weights_split_by_heads(runs):
    """DESIGN.md, "Parallelism": attention heads, KV heads and the MLP's hidden width on the
    `model` axis; the embedding and norms whole on every device. The LM head splits its
    vocabulary (untied: llama3; qwen2 ties it to the embedding)."""
    run = runs["llama3"][1]
    assert run["kv_spec"] == [None, "model"]
    assert run["kv_shard_shape"][1] * 2 == run["kv_shape"][1]
    want = {
        "qkv_proj']['kernel": [None, "model"],
        "o_proj']['kernel": ["model", None],
        "gate_up_proj']['kernel": [None, "model"],
        "down_proj']['kernel": ["model", None],
        "lm_head']['kernel": [None, "model"],
        "embed_tokens": [],
        "layernorm": [],
        "['norm']": [],
    }
    for part, spec in want.items():
        found = [s for name, s in run["param_specs"].items() if part in name]
        assert found and all(s == spec for s in found), (part, found)
    qwen2 = runs["qwen2"][1]["param_specs"]
    assert [s for n, s in qwen2.items() if "qkv_proj']['bias" in n][0] == ["model"]
    assert not any("lm_head" in n for n in qwen2)


def test_split_executables_load_from_the_cache(runs):
    """The second engine compiled nothing: every executable came from the first's cache, on
    the same two devices (and `test_split_model_matches_transformers[cached_again]` checks
    what they compute)."""
    assert runs["cached"][1]["num_loaded"] == 0
    assert runs["cached_again"][1]["num_loaded"] == runs["cached"][1]["num_executables"] > 0


def test_a_split_model_is_not_saved_as_orbax(runs):
    """`save_orbax` keeps the one-device layout; a split model's fused columns are grouped by
    shard, so it refuses one."""
    assert "tensor_parallel_size 1" in runs["orbax"][1]["save_split_error"]


def test_kv_cache_updated_in_place(runs):
    """The forward pass donates each device's share of the KV cache and writes it in place:
    a copy would double the cache's memory (on a GPU, an out-of-memory error at start-up)."""
    for name in CASES:
        run = runs[name][1]
        assert run["forward_alias_bytes"] >= run["kv_bytes_per_device"] > 0, name


@pytest.mark.parametrize(
    "overrides",
    [{}, {"intermediate_size": 256}, {"head_dim": 32}],
    ids=["plain_mlp_per_shard", "interleaved_mlp_per_shard", "head32"],
)
@pytest.mark.parametrize("num_shards", [2, 4])
def test_shard_columns_regroup_a_one_device_layout(overrides, num_shards):
    """An Orbax checkpoint holds the one-device layout; `shard_columns` regroups its fused
    columns into what `arrange_param` makes from the checkpoint for `num_shards`."""
    _, kwargs = FAMILIES["llama3"]
    hf = {**kwargs, **overrides, "num_attention_heads": 4, "num_key_value_heads": 4}
    cfg = ModelConfig.from_hf_dict({**hf, "architectures": ["LlamaForCausalLM"]})
    rng = np.random.default_rng(0)
    for name, width in [
        ("qkv_proj", (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim),
        ("gate_up_proj", 2 * cfg.intermediate_size),
    ]:
        value = rng.normal(size=(3, width))
        one = arrange_param(name, value, cfg)
        split = arrange_param(name, value, cfg, num_shards)
        np.testing.assert_array_equal(one[:, shard_columns(name, cfg, num_shards)], split)


def test_shard_sizes_must_divide():
    cfg = ModelConfig.from_hf_dict({**FAMILIES["llama3"][1], "architectures": ["LlamaForCausalLM"]})
    half = cfg.shard(2)
    assert (half.num_heads, half.num_kv_heads, half.intermediate_size) == (2, 1, 96)
    assert (half.head_dim, half.hidden_size, half.vocab_size) == (16, 64, 320)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\), num_key_value_heads \(2\)$"):
        cfg.shard(3)
    with pytest.raises(ValueError, match="at least 1"):
        cfg.shard(0)


def test_more_shards_than_devices_is_refused(tmp_path):
    """This process has one CPU device."""
    from engine import LLM

    folder = write_checkpoint("llama3", tmp_path / "m")
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs 2 devices"):
        LLM(str(folder), tensor_parallel_size=2, skip_tokenizer_init=True, num_pages=8)
    with pytest.raises(ValueError, match="must divide"):
        LLM(str(folder), tensor_parallel_size=3, skip_tokenizer_init=True, num_pages=8)
