"""The Starlette app: OpenAI routes, Bearer auth on /v1, OpenAI-style errors, metrics.

`build_app(engine, ServerConfig(...))` is all a server needs; `api/serve_cli.py` adds uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.metrics import Metrics
from api.protocol import APIError
from api.serving import OpenAIServing, ServerConfig
from engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>`; other paths stay open."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key):
                err = APIError(
                    "Incorrect API key provided.", 401, code="invalid_api_key", param=None
                )
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"The request body is not valid JSON: {e}") from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _generation_route(handler: Callable[[Any], Awaitable[Response]]):
    """Run `handler(json body)`, cancelling it (which aborts its engine requests) if the client
    goes away first. Streams watch for the disconnect themselves once they have started."""

    async def endpoint(request: Request) -> Response:
        body = await _read_json(request)
        work = asyncio.create_task(handler(body))
        watch = asyncio.create_task(_until_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if work.done():
            return work.result()
        work.cancel()
        logger.info("client disconnected; request aborted")
        return Response(status_code=499)  # nobody is listening any more

    return endpoint


def _tokenizer_route(serving: OpenAIServing, handler: Callable[[Any], dict]):
    """/tokenize and /detokenize: run in the serving's tokenizer thread, with the prompts' own
    tokenizing (off the event loop, and never two encodes at once)."""

    async def endpoint(request: Request) -> Response:
        body = await _read_json(request)
        return JSONResponse(await serving.in_tokenizer_thread(handler, body))

    return endpoint


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(APIError(str(exc.detail), exc.status_code, type=kind))


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s", request.url.path, exc_info=exc)
    err = APIError("Internal server error.", 500, type="internal_server_error")
    return error_response(err)


def _version() -> str:
    try:
        return version("pagejax")
    except PackageNotFoundError:
        return "unknown"


def build_app(engine: AsyncEngine, config: ServerConfig) -> Starlette:
    """The OpenAI-compatible app around a started engine."""
    metrics = Metrics(engine.stats, config.served_model_names[0])
    serving = OpenAIServing(engine, config, metrics)

    async def models(request: Request) -> Response:
        return JSONResponse(serving.models())

    async def health(request: Request) -> Response:
        # 503 once the engine loop died: a load balancer should take this replica out.
        return Response(status_code=200 if engine.is_alive else 503)

    async def metrics_route(request: Request) -> Response:
        # Rendering every histogram is not free: keep it off the event loop.
        text = await asyncio.to_thread(metrics.render)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def version_route(request: Request) -> Response:
        return JSONResponse({"version": _version()})

    routes = [
        Route("/v1/completions", _generation_route(serving.completions), methods=["POST"]),
        Route("/v1/chat/completions", _generation_route(serving.chat), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/tokenize", _tokenizer_route(serving, serving.tokenize), methods=["POST"]),
        Route("/detokenize", _tokenizer_route(serving, serving.detokenize), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/version", version_route, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    app.state.serving = serving
    return app
