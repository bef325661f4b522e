"""GGUF checkpoints (llama.cpp's format) read as Hugging Face names, shapes and config.

A GGUF file carries everything a checkpoint folder does: the model config as `<arch>.*` metadata
keys, the tokenizer as `tokenizer.*` keys (chat template included) and the weights, often quantised
in ggml blocks. This module turns it into the same two things the safetensors loader gives the
model: an HF `config.json`-style dict and a stream of `(hf_name, array)` pairs with the names and
`[out, in]` shapes of transformers' `LlamaForCausalLM` state dict, dequantised one tensor at a time
so the peak host memory is about one tensor on top of the memory-mapped file.

Supported architectures: `llama` (Llama 2/3, Mistral, SmolLM), `qwen2`, `qwen3`.
"""

import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quant_shape_to_byte_shape

logger = logging.getLogger(__name__)

# GGUF `general.architecture` -> (HF model_type, HF architectures entry).
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# llama.cpp's convert_hf_to_gguf.py permutes the Q and K rows of these architectures only (it
# turns HF's rotate-half RoPE layout into the interleaved-pairs layout ggml's "normal" RoPE uses).
# Qwen2/3 use ggml's NEOX RoPE, which is HF's layout, so their weights are stored unpermuted.
# The loader takes every checkpoint through HF's layout (`unpermute_qk`) and then arranges it
# (models/layout.arrange_param). For llama that is a round trip: pagejax keeps q/k heads in the
# interleaved-pairs layout too (pallas_kernels/rope.py).
_PERMUTED_QK_ARCHITECTURES = frozenset({"llama"})

# `<arch>.<key>` metadata -> HF config key.
_CONFIG_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}

# Top-level GGUF tensor names -> HF names.
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Per-layer GGUF leaf (after `blk.N.`) -> HF leaf (after `model.layers.N.`).
_LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Tensors with no HF counterpart. `rope_freqs` holds Llama 3.1's per-frequency RoPE scaling
# factors, which HF recomputes from `rope_scaling` in the config instead of storing.
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class _TensorInfo:
    """One entry of a GGUF tensor table: `shape` in ggml order (fastest-moving dim first)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file


@dataclass(frozen=True)
class _GgufHeader:
    """A GGUF file's metadata and tensor table, and its bytes memory-mapped (not read)."""

    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]
    data: np.memmap  # the whole file, uint8

    def tensor_bytes(self, info: _TensorInfo) -> np.ndarray:
        """The tensor's stored bytes as a `[*rows, row_bytes]` uint8 view, dequantize's input."""
        byte_shape = quant_shape_to_byte_shape(tuple(reversed(info.shape)), info.qtype)
        return self.data[info.offset : info.offset + prod(byte_shape)].reshape(byte_shape)


_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}

# Arrays longer than this (the tokenizer's tokens, scores, merges: ~50k-150k entries) are skipped,
# not decoded: only the tokenizer needs them, and transformers reads them itself. Decoding them
# is what makes gguf.GGUFReader take seconds to open a file.
_MAX_ARRAY_LEN = 4096


def _read_string(buf: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _read_value(buf: np.ndarray, pos: int, value_type: int, full: bool = False) -> tuple[Any, int]:
    """One metadata value at `pos` -> (value, position after it). Long arrays come back as
    their length (as transformers' own reader does), unless `full`."""
    if value_type == GGUFValueType.STRING:
        return _read_string(buf, pos)
    if value_type != GGUFValueType.ARRAY:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    skip = count > _MAX_ARRAY_LEN and not full
    if item_type not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
        fmt = _SCALAR_FORMATS[item_type]
        end = pos + count * struct.calcsize(fmt)
        if skip:
            return count, end
        return np.frombuffer(bytes(buf[pos:end]), dtype=np.dtype(fmt)).tolist(), end
    items = []
    for _ in range(count):
        if item_type == GGUFValueType.STRING and skip:
            (length,) = struct.unpack_from("<Q", buf, pos)  # skip without decoding
            pos += 8 + length
        else:
            item, pos = _read_value(buf, pos, item_type)
            items.append(item)
    return (count if skip else items), pos


def _read_header(path: Path, full_arrays: frozenset[str] = frozenset()) -> _GgufHeader:
    """Parse a GGUF (v2/v3, little-endian) header; tensor data stays in the memory map."""
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, num_tensors, num_kv = struct.unpack_from("<IIQQ", buf, 0)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (bad magic bytes)")
    if version not in (2, 3):
        # A byte-swapped version number is how a big-endian file shows up.
        raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3, LE)")
    pos = 24
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key, pos = _read_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_value(buf, pos + 4, value_type, key in full_arrays)
    entries = []
    for _ in range(num_tensors):
        name, pos = _read_string(buf, pos)
        (num_dims,) = struct.unpack_from("<I", buf, pos)
        shape = struct.unpack_from(f"<{num_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * num_dims)
        pos += 4 + 8 * num_dims + 12
        entries.append((name, shape, GGMLQuantizationType(qtype), offset))
    # Tensor data starts at the next multiple of the alignment after the tensor table.
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-pos // alignment) * alignment
    tensors = {
        name: _TensorInfo(name, shape, qtype, data_start + offset)
        for name, shape, qtype, offset in entries
    }
    return _GgufHeader(metadata, tensors, buf)


def _as_written_float(value: float) -> float:
    """A float32 metadata value as the float the converter wrote (`1e-05`, not `9.9999997e-06`).

    GGUF stores floats as float32; the shortest decimal that round-trips through float32 is the
    value the HF config held, so configs compare equal to the original `config.json`.
    """
    return float(str(np.float32(value)))


def _config_from_header(header: _GgufHeader, path: Path) -> dict[str, Any]:
    """The HF config dict of a parsed GGUF header (see `read_gguf_config`)."""
    meta = header.metadata
    arch = meta["general.architecture"]
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported are {sorted(_ARCHITECTURES)}."
        )
    model_type, hf_class = _ARCHITECTURES[arch]
    config: dict[str, Any] = {"architectures": [hf_class], "model_type": model_type}
    for gguf_key, hf_key in _CONFIG_KEYS.items():
        if f"{arch}.{gguf_key}" in meta:
            config[hf_key] = meta[f"{arch}.{gguf_key}"]
    for key in ("rms_norm_eps", "rope_theta"):
        if key in config:
            config[key] = _as_written_float(config[key])
    # llama.cpp defaults the KV head count to the query head count (no GQA) when absent.
    config.setdefault("num_key_value_heads", config["num_attention_heads"])

    # `attention.key_length` is written when head_dim differs from hidden/heads (Qwen3 does);
    # llama writes `rope.dimension_count`, which equals head_dim for full-rotary models.
    head_dim = meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count"))
    config["head_dim"] = head_dim or config["hidden_size"] // config["num_attention_heads"]

    tensors = header.tensors
    # The embedding's row count is the model's vocab size; `<arch>.vocab_size` is optional and
    # the tokenizer's token list may be shorter than a padded embedding.
    config["vocab_size"] = tensors["token_embd.weight"].shape[1]
    config["tie_word_embeddings"] = "output.weight" not in tensors
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if "rope_freqs.weight" in tensors:
        logger.warning(
            "%s: has rope_freqs (Llama 3.1 RoPE scaling), which is not reconstructed into "
            "rope_scaling; long-context positions will be off",
            path,
        )

    for gguf_key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        if f"tokenizer.ggml.{gguf_key}_token_id" in meta:
            config[hf_key] = meta[f"tokenizer.ggml.{gguf_key}_token_id"]
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    config["torch_dtype"] = "float32"  # what `iter_gguf_tensors` yields by default
    return config


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """An HF `config.json`-style dict from a GGUF file's metadata.

    Keys: architectures, model_type, vocab_size, hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps,
    rope_theta, max_position_embeddings, tie_word_embeddings, bos_token_id, eos_token_id,
    pad_token_id (when the file has them), and for llama attention_bias / mlp_bias.
    Reads only the header (the tensor data stays memory-mapped, untouched).
    """
    path = Path(path)
    return _config_from_header(_read_header(path), path)


def _hf_name(gguf_name: str) -> str | None:
    """The HF state-dict name of a GGUF tensor, or None for tensors HF does not store."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name in _SKIPPED_TENSORS:
        return None
    match = _LAYER_NAME.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name")
    layer, leaf, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[leaf]}.{kind}"


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: `weight: [num_heads * H, ...]` -> same shape.

    convert_hf_to_gguf.py's `LlamaModel.permute` views each head's H rows as `[2, H/2]` (HF's
    rotate-half halves) and transposes them to `[H/2, 2]` (interleaved pairs). The inverse views
    them as `[H/2, 2]` and transposes back, as transformers' `LlamaTensorProcessor` does. For K,
    `num_heads` is the KV head count. Works for biases (`[num_heads * H]`) too.
    """
    half_head_dim = weight.shape[0] // num_heads // 2
    grouped = weight.reshape(num_heads, half_head_dim, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def iter_gguf_tensors(
    path: str | Path, dtype: np.dtype | type = np.float32
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, array)` for each tensor of a GGUF file, dequantised, one at a time.

    Names and shapes are those of transformers' state dict for the matching `*ForCausalLM`
    (linear weights `[out, in]`, e.g. `model.layers.0.self_attn.q_proj.weight: [N*H, D]`;
    `model.embed_tokens.weight: [V, D]`; `lm_head.weight` only if the file has `output.weight`).
    Q/K rows are un-permuted for llama. Each array is a fresh array of `dtype` (it holds no
    reference to the file's memory map), so a consumer that drops it after use keeps the peak
    host memory near one tensor. `dtype` may be any numpy dtype, e.g. `ml_dtypes.bfloat16`.
    """
    path = Path(path)
    header = _read_header(path)
    config = _config_from_header(header, path)
    permuted = config["model_type"] in _PERMUTED_QK_ARCHITECTURES
    for tensor in header.tensors.values():
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            continue
        # Quantised data is [rows, bytes per row] uint8; dequantize gives [rows, cols] float32,
        # which is numpy (row-major) order: ggml's `ne = [in, out]` becomes HF's `[out, in]`.
        weight = dequantize(header.tensor_bytes(tensor), tensor.qtype)
        if permuted and ".attn_q." in tensor.name:
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif permuted and ".attn_k." in tensor.name:
            weight = unpermute_qk(weight, config["num_key_value_heads"])
        # np.array copies: F32 tensors come back as views of the memory map.
        yield hf_name, np.array(weight, dtype=dtype)


_TOKENIZER_ARRAYS = frozenset(
    f"tokenizer.ggml.{key}" for key in ("tokens", "merges", "token_type", "scores")
)
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def load_gguf_tokenizer(path: str | Path) -> Any:
    """A transformers fast tokenizer rebuilt from the GGUF's `tokenizer.*` metadata.

    transformers' own converter (`convert_gguf_tokenizer`) builds the vocabulary, merges,
    special tokens and chat template, but its GGUF reader imports torch, which the runtime does
    not install: so the metadata comes from our reader, grouped as transformers'
    `get_gguf_tokenizer` groups it. A file without a chat template (a base model) loads with a
    warning: completions work, chat does not.
    """
    from transformers import PreTrainedTokenizerFast  # slow import; only tokenizer users pay it
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    path = Path(path)
    metadata = _read_header(path, _TOKENIZER_ARRAYS).metadata
    grouped = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece files
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
    if not tokenizer.chat_template:
        logger.warning("%s: GGUF metadata has no tokenizer.chat_template", path)
    return tokenizer
