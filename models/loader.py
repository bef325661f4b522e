"""Build a model from a local checkpoint: HF safetensors folder, GGUF file, Orbax checkpoint
saved by `save_orbax`, or random weights of the real shape (`load_format="dummy"`).

Tensors stream one at a time from the reader, are converted and placed on the device, and the
host copy is dropped: peak host memory is about one tensor, not the model.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

import sharding
from models.config import ModelConfig
from models.layout import arrange_param, fused_parts, shard_columns
from models.registry import get_model_class
from models.safetensors_reader import CheckpointError, iter_safetensors
from pallas_kernels import gate_up
from pallas_kernels.attention import AttentionBackend

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")
_ORBAX_DIR = "pagejax_params"
# How save_orbax's parameters differ from the checkpoint's tensors besides fusing
# (`arrange_param`): gate_up_proj interleaved, q/k heads with RoPE's pairs interleaved.
# Checkpoints saved before this file was written hold HF's layouts, and are rearranged as they
# load; those saved with the first layout file (gate/up alone) get their RoPE pairs arranged.
_LAYOUT_FILE = "pagejax_layout.json"
_GATE_UP_LAYOUT = {"gate_up_proj": {"layout": "interleaved", "block": gate_up.BLOCK}}
_LAYOUT = {**_GATE_UP_LAYOUT, "rope": {"layout": "pairs_interleaved"}}
_ROPE_PARAMS = ("qkv_proj", "q_norm", "k_norm")
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    aliases = {
        "auto": "bfloat16",
        "bf16": "bfloat16",
        "half": "float16",
        "float": "float32",
        "fp32": "float32",
        "fp16": "float16",
    }
    name = aliases.get(dtype, dtype) if isinstance(dtype, str) else dtype
    dt = jnp.dtype(name)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"unsupported dtype {dtype!r}: use bfloat16, float16 or float32")
    return dt


def detect_format(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    if (path / _ORBAX_DIR).is_dir():
        return "orbax"
    return "safetensors"


def read_hf_config(path: Path, load_format: str) -> dict[str, Any]:
    """The checkpoint's HF config dict (from config.json, or from GGUF metadata)."""
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if load_format == "gguf":
        from models.gguf import read_gguf_config

        return read_gguf_config(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no config.json in the model folder")
    return json.loads(cfg_file.read_text())


def hf_name_to_path(name: str) -> tuple[tuple[str | int, ...], bool] | None:
    """`model.layers.3.mlp.up_proj.weight` -> (("model", "layers", 3, "mlp", "up_proj",
    "kernel"), transpose=True). None when the name cannot belong to this model family."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    leaf, parent = parts[-1], parts[-2]
    path = tuple(int(p) if p.isdigit() else p for p in parts[:-1])
    if leaf == "bias":
        return path + ("bias",), False
    if leaf != "weight":
        return None
    if parent == "embed_tokens":
        return path + ("embedding",), False
    if parent.endswith("norm"):
        return path + ("scale",), False
    return path + ("kernel",), True


def _flatten(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _path_name(path: tuple) -> str:
    """The checkpoint (HF) name of a parameter path, for messages."""
    leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
    return ".".join(str(p) for p in (*path[:-1], leaf))


class _FusedBuffers:
    """Host buffers of fused parameters (qkv_proj, gate_up_proj) while their checkpoint parts
    arrive one tensor at a time; a buffer goes to the device once all its parts are in."""

    def __init__(self, parts: dict[str, tuple[tuple[str, int], ...]]):
        self.parts = parts
        self.buffers: dict[tuple, np.ndarray] = {}
        self.filled: dict[tuple, set[str]] = {}

    def locate(self, path: tuple) -> tuple[tuple, int, int] | None:
        """A checkpoint path (.., "q_proj", "kernel") -> (fused path, column offset, width)."""
        for fused, parts in self.parts.items():
            offset = 0
            for name, width in parts:
                if path[-2] == name:
                    return (*path[:-2], fused, path[-1]), offset, width
                offset += width
        return None

    def put(self, path: tuple, part: str, offset: int, value: np.ndarray, shape, dtype):
        """Write one part; returns the whole buffer when it is complete, else None."""
        buf = self.buffers.setdefault(path, np.zeros(shape, dtype))
        buf[..., offset : offset + value.shape[-1]] = value
        self.filled.setdefault(path, set()).add(part)
        if len(self.filled[path]) < len(self.parts[path[-2]]):
            return None
        del self.filled[path]
        return self.buffers.pop(path)

    def missing(self) -> list[str]:
        """Checkpoint names of parts never seen, for fused parameters partly loaded."""
        out = []
        for path, seen in self.filled.items():
            for name, _ in self.parts[path[-2]]:
                if name not in seen:
                    out.append(_path_name((*path[:-2], name, path[-1])))
        return out


def fill_params(
    pure: dict,
    tensors: Iterable[tuple[str, np.ndarray, Path]],
    *,
    source: Path,
    dtype: jnp.dtype,
    tied: bool,
    fused: dict[str, tuple[tuple[str, int], ...]],
    arrange: Callable[[str, np.ndarray], np.ndarray] = lambda name, value: value,
    place: Callable[[tuple, np.ndarray], jax.Array] = lambda path, value: jax.device_put(value),
) -> dict:
    """Put every checkpoint tensor at its parameter path (parts of fused parameters at their
    column slice), through `arrange(module name, whole value)` into the model's layout, and
    onto the device(s) by `place(path, value)`; errors name the file and tensor."""
    expected = dict(_flatten(pure))
    loaded: set[tuple] = set()
    np_dtype = np.dtype(dtype)
    buffers = _FusedBuffers(fused)
    for name, array, file in tqdm(
        tensors, desc="loading weights", total=len(expected), leave=False
    ):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        mapped = hf_name_to_path(name)
        located = buffers.locate(mapped[0]) if mapped is not None else None
        target = located[0] if located else (mapped[0] if mapped else None)
        if target not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} for this architecture")
        path, transpose = mapped
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16):
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {array.dtype}")
        want = tuple(expected[target].shape)
        if located:
            want = (*want[:-1], located[2])
        got = tuple(array.shape[::-1]) if transpose else tuple(array.shape)
        if got != want:
            shown = tuple(array.shape)
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {shown}, the config implies "
                f"{want[::-1] if transpose else want}"
            )
        host = np.asarray(array.T if transpose else array).astype(np_dtype)
        if located:
            host = buffers.put(target, path[-2], located[1], host, expected[target].shape, np_dtype)
            if host is None:
                continue
        host = arrange(target[-2], host)
        _set(pure, target, place(target, host))
        loaded.add(target)
    never_seen = sorted(expected.keys() - loaded - set(buffers.filled), key=_path_name)
    missing = buffers.missing() + [
        _path_name((*p[:-2], part, p[-1])) if p[-2] in fused else _path_name(p)
        for p in never_seen
        for part in ([name for name, _ in fused[p[-2]]] if p[-2] in fused else [None])
    ]
    if missing:
        raise CheckpointError(
            f"{source}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    return pure


def dummy_params(
    pure: dict,
    *,
    dtype: jnp.dtype,
    seed: int,
    placement: Callable[[tuple], jax.sharding.Sharding | None] = lambda path: None,
) -> dict:
    """Random weights of the real shapes (benchmarks): N(0, 0.02), norm scales 1; each made
    where `placement(path)` puts it (None: the default device)."""
    key = jax.random.PRNGKey(seed)

    @functools.cache
    def normal(where):
        def draw(k, shape):
            return (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)

        return jax.jit(draw, static_argnames=("shape",), out_shardings=where)

    for i, (path, leaf) in enumerate(_flatten(pure)):
        shape, where = tuple(leaf.shape), placement(path)
        if path[-1] == "scale":
            value = jnp.ones(shape, dtype, device=where)
        elif path[-1] == "bias":
            value = jnp.zeros(shape, dtype, device=where)
        else:
            value = normal(where)(jax.random.fold_in(key, i), shape)
        _set(pure, path, value)
    return pure


def abstract_model(
    config: ModelConfig, dtype: jnp.dtype, backend: AttentionBackend, num_shards: int = 1
):
    """The model (one of `num_shards` tensor-parallel shards) with ShapeDtypeStruct leaves:
    no memory allocated."""
    cls = get_model_class(config.architecture)
    backend = AttentionBackend(backend)
    shard_axis = sharding.MODEL if num_shards > 1 else None
    return nnx.eval_shape(
        lambda: cls(
            config,
            dtype=dtype,
            attention_backend=backend,
            rngs=nnx.Rngs(0),
            num_shards=num_shards,
            shard_axis=shard_axis,
        )
    )


def load_model(
    path: str | Path | None,
    *,
    dtype: str | jnp.dtype = "bfloat16",
    load_format: str = "auto",
    attention_backend: AttentionBackend | str = "reference",
    hf_config: dict[str, Any] | None = None,
    seed: int = 0,
    tensor_parallel_size: int = 1,
):
    """Build the model for `path` (folder or .gguf; `None` = the embedded default model).

    `load_format="dummy"` needs only the config (from `path` or `hf_config`).
    Returns the NNX model; its `config` attribute is the `ModelConfig`. With
    `tensor_parallel_size` n > 1 it is the model of one shard (`LlamaForCausalLM`), holding
    the whole parameters split over the first n devices (`sharding.make_mesh`): the runner
    calls it under `shard_map`.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} not in {LOAD_FORMATS}")
    if path is None and hf_config is None:
        from models.default_model import default_model_path

        path = default_model_path()
    path = Path(path) if path is not None else None
    fmt = detect_format(path) if load_format in ("auto", "dummy") and path else load_format
    if hf_config is None:
        hf_config = read_hf_config(path, fmt)
    config = ModelConfig.from_hf_dict(hf_config)
    n = tensor_parallel_size
    config.shard(n)  # a clear error now if n does not divide the heads
    dt = resolve_dtype(dtype)
    backend = AttentionBackend(attention_backend)
    whole = abstract_model(config, dt, backend)
    model = abstract_model(config, dt, backend, n) if n > 1 else whole
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(nnx.state(whole))  # the whole parameters' shapes
    mesh = sharding.make_mesh(n) if n > 1 else None

    def where(path: tuple) -> jax.sharding.Sharding | None:
        return mesh and sharding.named_sharding(mesh, model.param_axes(path))

    if load_format == "dummy":
        pure = dummy_params(pure, dtype=dt, seed=seed, placement=where)
    elif fmt == "orbax":
        pure = restore_orbax(path, pure, config, placement=where, num_shards=n)
    else:
        pure = fill_params(
            pure,
            _tensors(path, fmt),
            source=path,
            dtype=dt,
            tied=config.tie_word_embeddings,
            fused=fused_parts(config),
            arrange=lambda name, value: arrange_param(name, value, config, n),
            place=lambda path, value: jax.device_put(value, where(path)),
        )
    nnx.replace_by_pure_dict(state, pure)
    logger.info("loaded %s (%s, %s) from %s", config.architecture, fmt, dt.name, path)
    if mesh is not None:
        logger.info("tensor parallel: split over %d devices (%s)", n, mesh.devices[0, 0].platform)
    return nnx.merge(graphdef, state)


def _tensors(path: Path, fmt: str) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(name, array, file it came from) for every tensor of the checkpoint."""
    if fmt == "gguf":
        from models.gguf import iter_gguf_tensors

        return ((name, array, path) for name, array in iter_gguf_tensors(path))
    return iter_safetensors(path)


def save_orbax(model, source: str | Path, dest: str | Path) -> Path:
    """Save converted parameters as an Orbax checkpoint in `dest`, with the source's config and
    tokenizer files, so `load_model(dest)` restarts without converting again."""
    import orbax.checkpoint as ocp

    if model.num_shards > 1:
        raise ValueError(
            "save_orbax takes a model loaded with tensor_parallel_size 1 (a sharded model "
            "keeps its fused parameters' columns grouped by shard)"
        )
    source, dest = Path(source), Path(dest).absolute()
    dest.mkdir(parents=True, exist_ok=True)
    fmt = detect_format(source)
    (dest / "config.json").write_text(json.dumps(read_hf_config(source, fmt)))
    if source.is_dir():
        for f in source.iterdir():
            if f.name.startswith("tokenizer") or f.name in (
                "special_tokens_map.json",
                "chat_template.jinja",
                "generation_config.json",
            ):
                shutil.copy(f, dest / f.name)
    else:
        (dest / "source_gguf.txt").write_text(str(source.absolute()))
    pure = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dest / _ORBAX_DIR, pure, force=True)
    (dest / _LAYOUT_FILE).write_text(json.dumps(_LAYOUT))
    return dest


def restore_orbax(
    path: Path,
    abstract_pure: dict,
    config: ModelConfig,
    *,
    placement: Callable[[tuple], jax.sharding.Sharding | None] = lambda path: None,
    num_shards: int = 1,
) -> dict:
    """The parameters saved by `save_orbax`, each restored where `placement(path)` puts it;
    for `num_shards` > 1, the fused ones' columns then gathered into their groups by shard
    (`arrange_param`), on the devices."""
    import orbax.checkpoint as ocp

    for leaf_path, leaf in list(_flatten(abstract_pure)):
        where = placement(leaf_path)
        if where is not None:
            _set(
                abstract_pure,
                leaf_path,
                jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
            )
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(path.absolute() / _ORBAX_DIR, abstract_pure)
    pure = _orbax_layout(path, pure, config)
    if num_shards > 1:
        for leaf_path, value in list(_flatten(pure)):
            columns = shard_columns(leaf_path[-2], config, num_shards)
            if columns is not None:
                _set(pure, leaf_path, _take_columns(value, columns, where=value.sharding))
    return pure


@functools.partial(jax.jit, static_argnames=("where",))
def _take_columns(value: jax.Array, columns: jax.Array, *, where) -> jax.Array:
    return jax.lax.with_sharding_constraint(jnp.take(value, columns, axis=-1), where)


def _orbax_layout(path: Path, pure: dict, config: ModelConfig) -> dict:
    """Restored parameters in this version's layouts (one shard)."""
    layout_file = path / _LAYOUT_FILE
    if layout_file.exists():
        saved = json.loads(layout_file.read_text())
        if saved == _LAYOUT:
            return pure
        if saved != _GATE_UP_LAYOUT:
            raise CheckpointError(
                f"{layout_file}: parameters saved as {saved}, this version keeps {_LAYOUT}; "
                "save it again from its source checkpoint (models.loader.save_orbax)"
            )
        logger.info("%s: q/k heads in HF's layout: interleaving RoPE's pairs", path)
        names = _ROPE_PARAMS
    else:
        logger.info(
            "%s: no %s, so parameters are in HF's layouts: arranging them", path, _LAYOUT_FILE
        )
        names = None
    for leaf_path, value in list(_flatten(pure)):
        if names is None or leaf_path[-2] in names:
            _set(pure, leaf_path, arrange_param(leaf_path[-2], value, config))
    return pure
