"""`pagejax serve [MODEL]`: the OpenAI-compatible server, with vLLM's flag names."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from api.cli import add_engine_args, engine_kwargs

logger = logging.getLogger("api.serve")


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    s.add_argument(
        "model", nargs="?", default=None, help="HF folder or .gguf (default: SmolLM2-135M)"
    )
    s.add_argument("--model", dest="model_flag", default=None, help="same as MODEL")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="names the API accepts (the first is reported by /v1/models)",
    )
    s.add_argument(
        "--api-key", default=None, help="require this Bearer key on /v1/* (or PAGEJAX_API_KEY)"
    )
    s.add_argument("--chat-template", default=None, help="a Jinja template, or a file holding one")
    s.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="answer 503 when this many requests wait already",
    )
    s.add_argument("--uvicorn-log-level", default="info")
    s.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="run this many engines, each on its own --tensor-parallel-size devices, and "
        "spread the requests over them",
    )
    add_engine_args(s)
    s.set_defaults(func=serve)


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        return path.read_text()
    if "{" not in value:  # neither a file nor a template: most likely a mistyped path
        raise FileNotFoundError(f"--chat-template: no such file: {value}")
    return value


def _model_name(model: str | None) -> str:
    if model is None:
        from models.default_model import DEFAULT_MODEL_FILENAME

        return Path(DEFAULT_MODEL_FILENAME).name.split(".")[0]  # SmolLM2-135M-Instruct
    return model.rstrip("/")


def _build_engine(args: argparse.Namespace, model: str | None):
    from engine.async_engine import AsyncEngine
    from engine.llm import model_max_len

    kwargs = engine_kwargs(args)
    if args.max_waiting_requests is not None:
        kwargs["max_waiting_requests"] = args.max_waiting_requests
    if "max_model_len" not in kwargs:
        kwargs["model_max_len"] = model_max_len(model, args.load_format)
    dp = args.data_parallel_size
    logger.info(
        "%s: loading %s and compiling the step for every bucket",
        "engine process" if dp == 1 else f"{dp} data-parallel engine processes",
        model or "the default model",
    )
    return AsyncEngine.in_process(model, kwargs, data_parallel_size=dp)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.server import build_app
    from api.serving import ServerConfig

    t0 = time.perf_counter()
    if args.log_level.upper() == "WARNING":  # the CLI's default: a server should say what it does
        for name in ("api", "engine", "models"):
            logging.getLogger(name).setLevel(logging.INFO)
    model = args.model_flag or args.model
    names = tuple(args.served_model_name or [_model_name(model)])
    config = ServerConfig(
        served_model_names=names,
        model_path=str(model or "default"),
        chat_template=_chat_template(args.chat_template),
        api_key=args.api_key or os.environ.get("PAGEJAX_API_KEY") or None,
    )
    engine = _build_engine(args, model)
    app = build_app(engine, config)
    uv_config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, access_log=False
    )
    server = uvicorn.Server(uv_config)
    sock = uv_config.bind_socket()  # bound before announcing, so the URL is good when logged
    host, port = sock.getsockname()[:2]
    logger.info(
        "serving %s at http://%s:%d/v1 (max_model_len %d; ready in %.1f s)",
        ", ".join(names),
        host,
        port,
        engine.config.scheduler.max_model_len,
        time.perf_counter() - t0,
    )
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
    return 0
