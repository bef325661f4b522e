"""The OpenAI endpoints' logic: request -> prompts and `SamplingParams` -> engine -> response.

Every error a client may cause is raised as `APIError` before the first byte of a response, except
in a stream, where a late error is sent as one `data: {"error": ...}` event before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from api import responses as R
from api.formatters import ChatFormatter, CompletionFormatter
from api.generation import Generation, Prompt
from api.metrics import Metrics
from api.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from engine.async_engine import AsyncEngine
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What the app needs besides the engine (read from flags and environment in serve_cli)."""

    served_model_names: tuple[str, ...]
    model_path: str = ""
    chat_template: str | None = None  # None: the tokenizer's own
    api_key: str | None = None


class SSEResponse(StreamingResponse):
    """An event stream that closes its `Generation` however the response ends (a client
    disconnect cancels the stream before the body iterator's own cleanup may run)."""

    def __init__(self, events: AsyncIterator[str], generation: Generation):
        super().__init__(events, media_type="text/event-stream")
        self._generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.close()


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: Metrics | None = None):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.config.scheduler.max_model_len
        # Prompts are tokenized off the event loop (a 1k-token prompt takes milliseconds), one
        # at a time: encoding may reset a fast tokenizer's truncation (a mutable borrow, which
        # fails if another thread is encoding).
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="pagejax-tokenizer")

    async def in_tokenizer_thread(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` in the tokenizer thread, awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenizer_thread, functools.partial(fn, *args, **kwargs)
        )

    # -- helpers ----------------------------------------------------------------------------
    def model_name(self, requested: str | None) -> str:
        names = self.config.served_model_names
        if requested is None:
            return names[0]
        if requested not in names:
            raise APIError(
                f"The model `{requested}` does not exist.",
                404,
                param="model",
                code="model_not_found",
            )
        return requested

    def _tokenize(self, prompt: str | list[int]) -> Prompt:
        text, token_ids = self.engine.inputs.tokenize(prompt)
        return Prompt(text, token_ids)

    def _chat_prompt(
        self, messages: list[ChatMessage], add_generation_prompt: bool, **kw
    ) -> Prompt:
        tok = self.tokenizer
        template = self.config.chat_template
        if template is None and not getattr(tok, "chat_template", None):
            raise APIError(
                "This model has no chat template; start the server with --chat-template."
            )
        try:
            ids = tok.apply_chat_template(
                [m.as_template_input() for m in messages],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                **kw,
            )
        except Exception as e:  # a template error is the request's (or the template's) fault
            raise APIError(f"Could not apply the chat template: {e}", param="messages") from e
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return Prompt(None, list(ids))

    def _validate(self, prompt: Prompt, params: SamplingParams) -> None:
        n = len(prompt.token_ids)
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n + params.max_tokens} tokens ({n} in the prompt, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                "prompt or max_tokens.",
                param="max_tokens",
            )
        try:
            self.engine.inputs.validate(prompt.token_ids, params)
        except ValueError as e:
            raise APIError(str(e), param="prompt") from None

    async def _start(
        self, prefix: str, prompts: list[Prompt], params: SamplingParams, priority: int
    ) -> tuple[Generation, tuple[int, Any]]:
        """Start the generation and wait for its first delta, so that a full queue or a bad
        prompt still gets an HTTP error status."""
        for p in prompts:
            self._validate(p, params)
        gen = Generation(
            self.engine,
            f"{prefix}-{uuid.uuid4().hex}",
            prompts,
            params,
            priority=priority,
            metrics=self.metrics,
        )
        try:
            first = await gen.next()
        except BaseException:
            gen.close()
            raise
        return gen, first

    @staticmethod
    def _params(request: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        request.check_supported()
        try:
            return request.to_sampling_params()
        except ValueError as e:
            raise APIError(str(e)) from None

    # -- /v1/completions --------------------------------------------------------------------
    async def completions(self, body: Any) -> Response:
        req = parse(CompletionRequest, body)
        model = self.model_name(req.model)
        params = self._params(req)
        prompts = await self.in_tokenizer_thread(lambda: [self._tokenize(p) for p in req.prompts()])
        gen, first = await self._start("cmpl", prompts, params, req.priority)
        fmt = CompletionFormatter(req, params, prompts, model, self.tokenizer)
        return await self._respond(req.stream, gen, first, fmt)

    # -- /v1/chat/completions ---------------------------------------------------------------
    async def chat(self, body: Any) -> Response:
        req = parse(ChatCompletionRequest, body)
        model = self.model_name(req.model)
        params = self._params(req)
        prompt = await self.in_tokenizer_thread(
            self._chat_prompt,
            req.messages,
            req.add_generation_prompt,
            **(req.chat_template_kwargs or {}),
        )
        gen, first = await self._start("chatcmpl", [prompt], params, req.priority)
        fmt = ChatFormatter(req, params, prompt, model)
        return await self._respond(req.stream, gen, first, fmt)

    async def _respond(self, stream: bool, gen: Generation, first, fmt) -> Response:
        if stream:
            return SSEResponse(self._events(gen, first, fmt), gen)
        try:
            item = first
            while item is not None:
                fmt.add(*item)
                item = await gen.next()
        finally:
            gen.close()
        return JSONResponse(fmt.response())

    async def _events(self, gen: Generation, first, fmt) -> AsyncIterator[str]:
        try:
            for chunk in fmt.stream_start():
                yield R.sse(chunk)
            item = first
            while item is not None:
                for chunk in fmt.chunks(*item):
                    yield R.sse(chunk)
                item = await gen.next()
            for chunk in fmt.stream_end():
                yield R.sse(chunk)
        except Exception as e:  # too late for a status code: report it in the stream
            err = e if isinstance(e, APIError) else _internal(e)
            yield R.sse(err.body())
        finally:
            gen.close()
        yield R.sse("[DONE]")

    # -- /tokenize, /detokenize, /v1/models -------------------------------------------------
    def tokenize(self, body: Any) -> dict[str, Any]:
        req = parse(TokenizeRequest, body)
        self.model_name(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of prompt and messages.", param="prompt")
        if req.messages is not None:
            ids = self._chat_prompt(req.messages, req.add_generation_prompt).token_ids
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        ids = list(ids)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                "token_strs": strs}  # fmt: skip

    def detokenize(self, body: Any) -> dict[str, Any]:
        req = parse(DetokenizeRequest, body)
        self.model_name(req.model)
        vocab = self.engine.inputs.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(
                f"token id {bad[0]} is outside the vocabulary [0, {vocab}).", param="tokens"
            )
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def models(self) -> dict[str, Any]:
        name = self.config.served_model_names[0]
        card = {"id": name, "object": "model", "created": R.now(), "owned_by": "pagejax",
                "root": self.config.model_path or name, "parent": None,
                "max_model_len": self.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}


def _internal(e: BaseException) -> APIError:
    logger.error("request failed", exc_info=e)
    return APIError("Internal server error.", 500, type="internal_server_error")
