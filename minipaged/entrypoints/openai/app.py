"""The FastAPI app: routes, API-key check, error mapping and client-disconnect handling.

``build_app(engine, ...)`` takes any object with AsyncLLM's interface (``generate``,
``validate``, ``chat_prompt``, ``stats``, ``tokenizer``, ``config``, ``shutdown``), so the
app holds no global state and several can live in one process.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minipaged.entrypoints.openai.errors import APIError, from_input_error, from_validation_error
from minipaged.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from minipaged.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from minipaged.entrypoints.openai.serving import (
    ChatHandler,
    CompletionHandler,
    RequestLimits,
    as_api_error,
    check_strings,
)
from minipaged.errors import InputError

_log = logging.getLogger("minipaged.entrypoints.openai")

# How often the app checks that the engine is alive (it cannot be told: the engine may be any object).
_ENGINE_WATCH_S = 0.5

# HTTP has no status for "the client left"; nginx's 499 is the usual choice. Nobody reads it.
_CLIENT_CLOSED = 499


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, also when the client disconnected.

    Starlette cancels the send loop on ``http.disconnect`` but leaves closing the abandoned
    generator to the garbage collector; closing it here aborts the engine requests at once.
    ``metrics.open_streams`` counts the responses between start and close.
    """

    def __init__(self, content: Any, *, metrics: ServerMetrics, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.metrics.open_streams += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.metrics.open_streams -= 1


class _APIKeyMiddleware:
    """401 for /v1 requests without ``Authorization: Bearer <api_key>``, checked before the body is read.

    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware, so streamed responses and
    disconnect notices pass through untouched.
    """

    def __init__(self, app: Any, *, api_key: str, reject: Callable[[APIError], Response]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.reject = reject

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
                await self.reject(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    """The client closed the connection before its non-streamed answer was ready."""


async def with_cancellation(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work`` unless the client disconnects first; then cancel it (aborting its engine requests).

    Raises ``ClientDisconnected`` when the client left first (the work is cancelled and awaited).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


class _BodyLimitMiddleware:
    """413 for a request body over ``max_bytes``: by its Content-Length, or counted as it streams in."""

    def __init__(self, app: Any, *, max_bytes: int, reject: Callable[[APIError], Response]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.reject = reject

    def _too_large(self) -> APIError:
        return APIError(413, f"request body larger than this server's limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self.reject(self._too_large())(scope, receive, send)
            return
        # Read the whole body first (the JSON parser needs all of it anyway), so that an oversized
        # chunked body is refused before any of it is parsed.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self.reject(self._too_large())(scope, receive, send)
                return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _watch_engine(engine: Any, on_engine_dead: Callable[[], None]) -> None:
    while getattr(engine, "is_running", True):
        await asyncio.sleep(_ENGINE_WATCH_S)
    _log.error("the engine has stopped: shutting the server down (requests in flight are answered with 503)")
    on_engine_dead()


def build_app(
    engine: Any,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    on_engine_dead: Callable[[], None] | None = None,
    limits: RequestLimits | None = None,
    max_request_bytes: int | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine``; ``api_key``: required as ``Authorization: Bearer`` on /v1.

    ``on_engine_dead``: called once when the engine stops for good (``serve`` then exits non-zero,
    so a supervisor restarts it, rather than answering 503 forever). ``limits``: samples and prompts
    one request may ask for; ``max_request_bytes``: the largest body (413 beyond it).
    """
    served = model_name or engine.model_name
    metrics = ServerMetrics(engine)
    completions = CompletionHandler(engine, served, limits)
    chat = ChatHandler(engine, served, limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        watcher = None if on_engine_dead is None else asyncio.create_task(_watch_engine(engine, on_engine_dead))
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await engine.shutdown()

    app = FastAPI(title="minipaged", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    def error_response(err: APIError) -> JSONResponse:
        metrics.http_errors.labels(status=str(err.status)).inc()
        return err.response()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, err: InputError) -> JSONResponse:
        return error_response(from_input_error(err))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_error(err, request.headers.get("content-type", "")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, err: Exception) -> JSONResponse:
        return error_response(as_api_error(err))

    def unexpected(err: Exception) -> JSONResponse:
        """Answer an unexpected error here: Starlette's last-resort handler answers, then re-raises."""
        api = as_api_error(err)
        if api.status >= 500:
            _log.error("request failed: %s", api.message, exc_info=err)
        return error_response(api)

    if max_request_bytes is not None:
        app.add_middleware(_BodyLimitMiddleware, max_bytes=max_request_bytes, reject=error_response)
    if api_key is not None:  # added last: runs first, so an unauthorised body is never read
        app.add_middleware(_APIKeyMiddleware, api_key=api_key, reject=error_response)

    async def generate(handler: Any, body: Any, request: Request) -> Response:
        try:
            return await _generate(handler, body, request)
        except (APIError, InputError):
            raise
        except ClientDisconnected:
            _log.info("client disconnected; its request was aborted")
            metrics.client_disconnects.inc()
            return Response(status_code=_CLIENT_CLOSED)
        except Exception as err:  # noqa: BLE001 -- answered with an OpenAI-shaped 5xx, logged with its traceback
            return unexpected(err)

    async def _generate(handler: Any, body: Any, request: Request) -> Response:
        if not getattr(engine, "is_running", True):
            raise APIError(503, "the engine has stopped; the server is shutting down")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only allowed with stream=true", "stream_options")
        check_strings(body)
        timer = metrics.timer()
        # Raises before anything is queued. In a thread: tokenizing a long prompt would stall every stream.
        prompts, params = await asyncio.to_thread(handler.prepare, body)
        if body.stream:
            return _ClosingStreamingResponse(
                handler.stream(body, prompts, params, timer), metrics=metrics, media_type="text/event-stream"
            )
        return JSONResponse(await with_cancellation(request, handler.full(body, prompts, params, timer)))

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await generate(completions, body, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(chat, body, request)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        card = {
            "id": served,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "minipaged",
            "max_model_len": engine.config.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if not getattr(engine, "is_running", True):  # the engine loop failed: nothing can be served
            return error_response(APIError(503, "the engine has stopped; the server is shutting down"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
