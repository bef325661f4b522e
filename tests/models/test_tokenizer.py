"""Loading a checkpoint folder's tokenizer in a process that blocks torch, as the server does."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.hf_models import write_checkpoint

TEXTS = ["Hello, world!", "<|im_start|>user\nhi<|im_end|>", "3.14159 and 1234567"]


def test_tokenizer_loads_with_torch_blocked_and_encodes_like_transformers(tmp_path):
    """The server and its engine process block torch (`block_torch_import`): a folder's
    tokenizer loads there without importing it, and encodes and templates as
    `AutoTokenizer` does in this process (where torch is imported)."""
    from transformers import AutoTokenizer

    from models.default_model import default_model_path
    from models.gguf import load_gguf_tokenizer

    write_checkpoint("llama2_tied", tmp_path, vocab_size=49152)
    load_gguf_tokenizer(default_model_path()).save_pretrained(tmp_path)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    code = (
        "import json, sys\n"
        "from models.tokenizer import block_torch_import, load_tokenizer\n"
        "block_torch_import()\n"
        f"tok = load_tokenizer({str(tmp_path)!r})\n"
        f"ids = [tok.encode(t) for t in {TEXTS!r}]\n"
        f"chat = tok.apply_chat_template({messages!r}, tokenize=False,"
        " add_generation_prompt=True)\n"
        "print(json.dumps([ids, chat, sys.modules.get('torch') is None]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ids, chat, blocked = json.loads(out.stdout.strip().splitlines()[-1])
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert blocked, "torch was imported before it could be blocked"
    assert ids == [hf.encode(t) for t in TEXTS]
    assert chat == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
