"""Checkpoint loading: sharded safetensors, bf16, Orbax round trip, dummy weights, and one clear
error (naming the file and tensor) for each way a checkpoint can be wrong."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from models.loader import load_model, save_orbax
from models.registry import UnsupportedArchitectureError
from models.safetensors_reader import CheckpointError, iter_safetensors
from pallas_kernels.rope import deinterleave_rope_pairs, interleave_rope_pairs
from tests.hf_models import write_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"))


def _tensors(folder) -> dict[str, np.ndarray]:
    return {name: np.array(a) for name, a, _ in iter_safetensors(folder)}


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _copy_with(src, dst, tensors: dict[str, np.ndarray], config: dict | None = None):
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return dst


def test_sharded_checkpoint_with_index_loads_the_same(folder, tmp_path):
    tensors = _tensors(folder)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    a, b = load_model(folder, dtype="float32"), load_model(tmp_path, dtype="float32")
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bf16_checkpoint_loads_exactly(folder, tmp_path):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(folder).items()}
    bf16 = _copy_with(folder, tmp_path / "bf16", tensors)
    model = load_model(bf16, dtype="bfloat16")
    emb = np.asarray(model.model.embed_tokens.embedding[...])
    assert emb.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(emb, tensors["model.embed_tokens.weight"])
    # q/k/v fused, q's and k's heads with RoPE's pairs side by side, the bias (Qwen2) too
    attn = model.model.layers[1].self_attn
    for part, want in (("kernel", "weight"), ("bias", "bias")):
        got = np.asarray(getattr(attn.qkv_proj, part)[...])
        q, k, v = (tensors[f"model.layers.1.self_attn.{p}_proj.{want}"].T for p in "qkv")
        h = model.config.head_dim
        np.testing.assert_array_equal(got[..., : q.shape[-1]], interleave_rope_pairs(q, h))
        np.testing.assert_array_equal(
            got[..., q.shape[-1] : -v.shape[-1]], interleave_rope_pairs(k, h)
        )
        np.testing.assert_array_equal(got[..., -v.shape[-1] :], v)


def test_orbax_round_trip(folder, tmp_path):
    model = load_model(folder, dtype="float32")
    dest = save_orbax(model, folder, tmp_path / "ckpt")
    restored = load_model(dest, dtype="float32")
    for x, y in zip(_params(model), _params(restored), strict=True):
        np.testing.assert_array_equal(x, y)


def test_dummy_weights_have_the_real_shapes(folder):
    real, dummy = load_model(folder), load_model(folder, load_format="dummy")
    assert [x.shape for x in _params(real)] == [x.shape for x in _params(dummy)]
    assert all(np.isfinite(x).all() for x in _params(dummy))


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/nonexistent/model")


def test_missing_tensor(folder, tmp_path):
    tensors = _tensors(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    bad = _copy_with(folder, tmp_path / "m", tensors)
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.1\.mlp\.up_proj"):
        load_model(bad)


def test_extra_tensor(folder, tmp_path):
    tensors = _tensors(folder)
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    bad = _copy_with(folder, tmp_path / "m", tensors)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors.*unexpected tensor "
        r"'model\.layers\.0\.mlp\.extra_proj\.weight'",
    ):
        load_model(bad)


def test_shape_mismatch(folder, tmp_path):
    tensors = _tensors(folder)
    tensors["model.layers.0.self_attn.o_proj.weight"] = np.zeros((64, 32), np.float32)
    bad = _copy_with(folder, tmp_path / "m", tensors)
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.0\.self_attn\.o_proj\.weight' "
        r"has shape \(64, 32\).*\(64, 64\)",
    ):
        load_model(bad)


def test_unsupported_dtype(folder, tmp_path):
    tensors = _tensors(folder)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
    bad = _copy_with(folder, tmp_path / "m", tensors)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has unsupported dtype I8"):
        load_model(bad)


def test_unsupported_architecture(folder, tmp_path):
    bad = _copy_with(
        folder, tmp_path / "m", _tensors(folder), {"architectures": ["GPT2LMHeadModel"]}
    )
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM",
    ):
        load_model(bad)


def test_unsupported_model_dtype(folder):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(folder, dtype="int8")


def _deinterleave_rope_pairs(layer, cfg):
    """Put a layer's q/k columns (and q/k norm weights) back in HF's layout, as pagejax kept
    them before RoPE's pairs were interleaved."""
    h, rotated = cfg.head_dim, (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
    kernel = layer.self_attn.qkv_proj.kernel
    kernel[...] = kernel[...].at[:, :rotated].set(deinterleave_rope_pairs(kernel[:, :rotated], h))
    for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
        if norm is not None:
            norm.scale[...] = deinterleave_rope_pairs(norm.scale[...], h)


def test_orbax_checkpoint_saved_with_the_gate_up_layout_alone_loads_rearranged(tmp_path):
    """A checkpoint whose layout file names the interleaved gate/up only (q/k heads in HF's
    layout, with q/k norms: Qwen3) loads with RoPE's pairs interleaved."""
    src = write_checkpoint("qwen3", tmp_path / "qwen3")
    model = load_model(src, dtype="float32")
    old = load_model(save_orbax(model, src, tmp_path / "ckpt"), dtype="float32")
    for layer in old.model.layers:
        _deinterleave_rope_pairs(layer, old.config)
    dest = save_orbax(old, src, tmp_path / "ckpt")
    layout = json.loads((dest / "pagejax_layout.json").read_text())
    (dest / "pagejax_layout.json").write_text(json.dumps({"gate_up_proj": layout["gate_up_proj"]}))
    restored = load_model(dest, dtype="float32")
    for x, y in zip(_params(model), _params(restored), strict=True):
        np.testing.assert_array_equal(x, y)


def test_orbax_checkpoint_saved_before_the_interleaved_gate_up_loads_rearranged(tmp_path):
    from pallas_kernels import gate_up

    src = write_checkpoint("llama3", tmp_path / "llama3")  # F = 192: three blocks of 64
    model = load_model(src, dtype="float32")
    dest = save_orbax(model, src, tmp_path / "ckpt")
    # What an earlier pagejax wrote: gate_up_proj as [gate | up], and no layout file.
    old = load_model(dest, dtype="float32")
    for x, y in zip(_params(model), _params(old), strict=True):  # with the file: as saved
        np.testing.assert_array_equal(x, y)
    for layer in old.model.layers:
        kernel = layer.mlp.gate_up_proj.kernel
        kernel[...] = gate_up.deinterleave(kernel[...], 64)
        _deinterleave_rope_pairs(layer, old.config)
    (dest / "pagejax_layout.json").unlink()
    save_orbax(old, src, dest)
    (dest / "pagejax_layout.json").unlink()
    restored = load_model(dest, dtype="float32")
    for x, y in zip(_params(model), _params(restored), strict=True):
        np.testing.assert_array_equal(x, y)


def test_orbax_checkpoint_of_another_layout_is_refused(folder, tmp_path):
    dest = save_orbax(load_model(folder, dtype="float32"), folder, tmp_path / "ckpt")
    layout = json.loads((dest / "pagejax_layout.json").read_text())
    layout["gate_up_proj"]["block"] = 128
    (dest / "pagejax_layout.json").write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match="pagejax_layout.json.*save it again"):
        load_model(dest, dtype="float32")
