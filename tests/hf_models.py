"""Tiny random Hugging Face checkpoints of each supported family, written by transformers' own
classes, and a plain paged-cache forward used to compare pagejax with transformers."""

from __future__ import annotations

import copy
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import AttentionMetadata
from pallas_kernels.reference import kv_cache_shape

_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama3": (
        "LlamaConfig",
        dict(
            _COMMON,
            intermediate_size=192,  # three gate/up blocks of 64: the interleaved layout
            rope_theta=500000.0,
            tie_word_embeddings=False,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama2_tied": ("LlamaConfig", dict(_COMMON, tie_word_embeddings=True, num_key_value_heads=4)),
    # Every bias Llama's config allows: q, k, v and o_proj; gate, up and down.
    "llama_biases": (
        "LlamaConfig",
        dict(_COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    ),
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=16, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3": (
        "Qwen3Config",
        dict(_COMMON, head_dim=32, tie_word_embeddings=False, use_sliding_window=False),
    ),
}


def write_checkpoint(family: str, folder: Path, *, seed: int = 0, **overrides) -> Path:
    """Save a random model of `family` with `save_pretrained` (safetensors) into `folder`."""
    import torch
    import transformers

    config_cls, kwargs = FAMILIES[family]
    # A deep copy: transformers 5 writes rope_theta into the rope_scaling dict it is given, which
    # would then override a later call's rope_theta.
    config = getattr(transformers, config_cls)(**copy.deepcopy({**kwargs, **overrides}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so layers matter to the output
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif p.ndim == 1:
                p.normal_(1.0 if p.shape[0] else 0.0, 0.1)
    model.save_pretrained(folder)
    return folder


def hf_logits(folder: Path, token_ids: list[int]) -> np.ndarray:
    """transformers' float32 logits [L, V] for one sequence."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def hf_greedy(folder: Path, token_ids: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation, EOS included where it is the argmax: what `ignore_eos`
    asks of an engine (vLLM's meaning: do not stop at EOS, not never sample it). `generate`
    with `min_new_tokens` would mask EOS instead."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = list(token_ids)
    with torch.no_grad():  # a whole forward a token: tiny models, no cache API to track
        for _ in range(num_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(token_ids) :]


def single_request_metadata(
    start: int, num_new: int, page_ids: list[int], page_size: int
) -> AttentionMetadata:
    """Metadata for one request computing tokens [start, start + num_new)."""
    positions = np.arange(start, start + num_new)
    slots = np.array(page_ids)[positions // page_size] * page_size + positions % page_size
    return AttentionMetadata(
        slot_ids=jnp.asarray(slots, jnp.int32),
        page_table=jnp.asarray([page_ids], jnp.int32),
        kv_lens=jnp.asarray([start + num_new], jnp.int32),
        query_start=jnp.asarray([0, num_new], jnp.int32),
        num_seqs=jnp.asarray([1], jnp.int32),
    )


def empty_caches(model, num_pages: int, page_size: int) -> list:
    cfg = model.config
    dtype = model.model.embed_tokens.embedding[...].dtype
    shape = kv_cache_shape(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]


def fused_against_xla_layers(hidden: int, mlp: int, backend) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 2-layer bf16 Llama (random weights and norm weights) over a 64-, a 32- and a
    16-token step with its decode-sized layers fused (pallas_kernels/decode_matmul.py, the
    default) and then with the same layers left to XLA (`fused_shapes` None, as
    `PAGEJAX_GPU_DECODE_MATMUL=xla` builds them): (fused, xla). At 4,096 / 14,336 the widths
    and heads (32 / 8) are Llama-3-8B's, so are the fused kernels' tiles and partial sums."""
    from flax import nnx

    from models.config import ModelConfig
    from models.llama import LlamaForCausalLM

    heads, kv_heads = (32, 8) if hidden == 4096 else (8, 2)
    cfg = ModelConfig.from_hf_dict(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": mlp,
         "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 128,
         "num_hidden_layers": 2, "vocab_size": 1000, "rms_norm_eps": 1e-5}
    )  # fmt: skip
    model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, attention_backend=backend, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    layers = model.model.layers
    norms = [model.model.norm] + [layer.input_layernorm for layer in layers]
    for norm in norms + [layer.post_attention_layernorm for layer in layers]:
        norm.scale[...] = jnp.asarray(1 + 0.2 * rng.normal(size=hidden), jnp.bfloat16)
    steps = ((0, 64), (64, 96), (96, 112))
    assert all(layer.fused_mode(b - a) is not None for layer in layers for a, b in steps)
    page_ids, tokens = [3, 1, 4, 2, 6, 8, 5], rng.integers(0, 1000, size=112)

    @nnx.jit
    def forward(model, token_ids, positions, caches, meta):
        hidden, caches = model(token_ids, positions, caches, meta)
        return model.logits(hidden), caches

    def run():
        caches, out = empty_caches(model, 9, 16), []
        for start, stop in steps:
            meta = single_request_metadata(start, stop - start, page_ids, 16)
            positions = jnp.arange(start, stop, dtype=jnp.int32)
            logits, caches = forward(
                model, jnp.asarray(tokens[start:stop]), positions, caches, meta
            )
            out.append(np.asarray(logits))
        return np.concatenate(out)

    fused = run()
    for layer in layers:
        layer.fused_shapes = None
    assert layers[0].fused_mode(16) is None
    return fused, run()
