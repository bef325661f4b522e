"""One real `pagejax serve` (uvicorn, 127.0.0.1) per test session, on a tiny random Llama that has
SmolLM2's real tokenizer and chat template; tests talk to it over HTTP only."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.hf_models import write_checkpoint

API_KEY = "test-key"
MODEL = "tiny"
ALIAS = "tiny-alias"
# Small engine settings: 3 token buckets (16, 32, 64) and one request bucket (8).
ENGINE_SETTINGS = dict(
    max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_pages=256, page_size=16
)
MAX_WAITING = 32


@dataclasses.dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    model_dir: Path
    compilation_cache_dir: Path
    log: list[str]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from models.default_model import default_model_path
    from models.gguf import load_gguf_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    write_checkpoint("llama2_tied", folder, vocab_size=49152)
    load_gguf_tokenizer(default_model_path()).save_pretrained(folder)
    return folder


def serve_command(model_dir: Path, cache_dir: Path) -> list[str]:
    s = ENGINE_SETTINGS
    return [
        sys.executable, "-m", "api.cli", "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", "0",
        "--served-model-name", MODEL, ALIAS,
        "--max-model-len", str(s["max_model_len"]),
        "--max-num-seqs", str(s["max_num_seqs"]),
        "--max-num-batched-tokens", str(s["max_num_batched_tokens"]),
        "--num-pages", str(s["num_pages"]),
        "--block-size", str(s["page_size"]),
        "--max-waiting-requests", str(MAX_WAITING),
        "--compilation-cache-dir", str(cache_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def offline_llm(model_dir):
    """The served model as the offline `LLM` on one device: what a split or replicated server
    must answer, token for token."""
    from engine import LLM

    return LLM(str(model_dir), compilation_cache_dir=None, **ENGINE_SETTINGS)


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("xla_cache")
    env = {"PAGEJAX_API_KEY": API_KEY, "JAX_PLATFORMS": "cpu"}
    yield from run_server(serve_command(model_dir, cache_dir), env, model_dir, cache_dir)


def run_server(command: list[str], env: dict[str, str], model_dir: Path, cache_dir: Path):
    """Start `pagejax serve` (`command`, with `env` added to this process's environment),
    yield its `Server` once it listens, stop it after, and fail if it logged errors."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
        cwd=Path(__file__).parents[2],
    )
    log: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read() -> None:  # drain the pipe so the server never blocks on a full one
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if m and not url:
                url.append(m.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 240
    while not ready.wait(1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("pagejax serve did not start:\n" + "".join(log[-40:]))
    yield Server(url[0], model_dir, cache_dir, log)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    errors = [line for line in log if "Traceback" in line or "never retrieved" in line]
    assert not errors, "the server logged errors:\n" + "".join(log[-60:])
