"""`pagejax serve` flags (vLLM's names), `--chat-template`, and internal errors, without starting an
engine: the app runs in-process over httpx's ASGI transport, on a stand-in engine."""

from __future__ import annotations

import asyncio
import types

import httpx
import pytest

from api.cli import build_parser
from api.serve_cli import _chat_template
from api.server import build_app
from api.serving import ServerConfig


def test_vllm_flag_names_parse():
    args = build_parser().parse_args(
        ["serve", "some/model", "--host", "127.0.0.1", "--port", "9000",
         "--served-model-name", "a", "b", "--api-key", "k", "--tensor-parallel-size", "1",
         "--max-model-len", "512", "--gpu-memory-utilization", "0.5", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "64", "--no-enable-prefix-caching", "--block-size", "32",
         "--dtype", "float32", "--seed", "3", "--load-format", "dummy",
         "--chat-template", "{{ x }}", "--max-waiting-requests", "7"]
    )  # fmt: skip
    assert args.model == "some/model" and args.served_model_name == ["a", "b"]
    assert (args.host, args.port, args.api_key, args.max_waiting_requests) == (
        "127.0.0.1", 9000, "k", 7
    )  # fmt: skip
    assert (args.max_model_len, args.page_size, args.enable_prefix_caching) == (512, 32, False)


def test_chat_template_from_file_or_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert _chat_template(str(path)) == "{{ messages }}"
    assert _chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(FileNotFoundError):
        _chat_template("no/such/template.jinja")


@pytest.fixture(scope="module")
def tokenizer():
    from models.default_model import default_model_path
    from models.gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(default_model_path())


def _stand_in_engine(tokenizer, generate=None):
    """What the app reads from an engine: a tokenizer, limits, and a `generate` if given."""
    return types.SimpleNamespace(
        tokenizer=tokenizer,
        config=types.SimpleNamespace(scheduler=types.SimpleNamespace(max_model_len=128)),
        inputs=types.SimpleNamespace(
            tokenize=lambda prompt: (prompt, [1, 2, 3]), validate=lambda ids, params: None
        ),
        stats=lambda: [],
        generate=generate,
        abort=lambda request_id: None,
        is_alive=True,
    )


def _get(app, path: str) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(go())


def test_health_reports_a_dead_engine(tokenizer):
    engine = _stand_in_engine(tokenizer)
    app = build_app(engine, ServerConfig(("m",)))
    assert _get(app, "/health").status_code == 200
    engine.is_alive = False
    assert _get(app, "/health").status_code == 503


def _post(app, path: str, body: dict) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, json=body)

    return asyncio.run(go())


def _tokenize(app, body: dict) -> dict:
    return _post(app, "/tokenize", body).json()


def test_chat_template_flag_overrides_the_tokenizers(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    app = build_app(_stand_in_engine(tokenizer), ServerConfig(("m",), chat_template=custom))
    got = _tokenize(app, {"messages": messages, "add_generation_prompt": False})
    assert got["tokens"] == tokenizer.encode("<user>hi<assistant>yo", add_special_tokens=False)
    default_app = build_app(_stand_in_engine(tokenizer), ServerConfig(("m",)))
    default = _tokenize(default_app, {"messages": messages, "add_generation_prompt": False})
    want = tokenizer.apply_chat_template(messages, tokenize=True)
    assert default["tokens"] == list(getattr(want, "input_ids", want))


@pytest.mark.parametrize("stream", [False, True])
def test_internal_error_is_a_bare_500(tokenizer, stream):
    async def broken_generate(prompt, params, request_id, priority=0):
        raise RuntimeError("secret internals")
        yield  # an async generator, like AsyncEngine.generate

    app = build_app(_stand_in_engine(tokenizer, broken_generate), ServerConfig(("m",)))
    resp = _post(app, "/v1/completions", {"prompt": "hi", "stream": stream})
    assert resp.status_code == 500
    assert resp.json() == {
        "error": {
            "message": "Internal server error.",
            "type": "internal_server_error",
            "param": None,
            "code": None,
        }
    }
