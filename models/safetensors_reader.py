"""Stream `(name, array)` pairs from a Hugging Face safetensors checkpoint folder.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte range of
every tensor) and the raw bytes. Reading it through `np.memmap` gives zero-copy views, including
bf16 (through ml_dtypes), which the `safetensors` package's numpy backend cannot return; peak host
memory is about one tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: the ones named by `model.safetensors.index.json`, else all."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: named by {index.name} but missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files in the model folder")
    return files


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def iter_safetensors(folder: str | Path) -> Iterator[tuple[str, np.ndarray, Path]]:
    """Yield (name, memory-mapped view, file) for every tensor of the folder's checkpoint."""
    for path in safetensors_files(Path(folder)):
        header, data_start = _read_header(path)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
        for name, info in header.items():
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has unsupported dtype {info['dtype']} "
                    f"(supported: {', '.join(_DTYPES)})"
                )
            begin, end = info["data_offsets"]
            yield name, data[begin:end].view(dtype).reshape(info["shape"]), path
