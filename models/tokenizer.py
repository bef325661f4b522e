"""Tokenizer (and chat template) for a model path, through `transformers.AutoTokenizer`."""

from __future__ import annotations

import sys
from pathlib import Path


def block_torch_import() -> None:
    """Make `import torch` fail in this process from now on, unless it is imported already.

    For processes that never run torch (the `pagejax` command, the server's engine process):
    transformers imports torch whenever it is installed, even for a tokenizer, and that import
    took 10 s of an 8B model's 23 s warm start-up on an H100 machine (torch with CUDA's
    libraries). transformers then treats torch as not installed."""
    sys.modules.setdefault("torch", None)


def load_tokenizer(path: str | Path | None):
    """Folder -> AutoTokenizer.from_pretrained(folder); .gguf -> tokenizer from its metadata;
    None -> the embedded default model's tokenizer."""
    if path is None:
        from models.default_model import default_model_path

        path = default_model_path()
    path = Path(path)
    pointer = path / "source_gguf.txt"  # an Orbax checkpoint converted from a GGUF file
    if path.is_dir() and pointer.is_file():
        path = Path(pointer.read_text().strip())
    if path.suffix == ".gguf":
        from models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
