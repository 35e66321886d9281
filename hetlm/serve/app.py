"""The FastAPI application of ``hetlm serve``, and ``run_server`` to serve it with uvicorn.

Requests are read, authorised and parsed (``hetlm.serve.protocol``) on the event loop, then handed as jobs
to the engine (``hetlm.serve.engine``), whose thread owns the model; its events come back onto the loop
through a queue. A request the engine has no room for is answered 503.

Endpoints: ``GET /health`` (no key), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``. Chat messages go through ``hetlm.chat.render_chat``. Sampling is
``hetlm.sampling.Sampler``'s: a prompt must fit the context, but ``max_tokens`` may run past it (the
window slides).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetlm.config import SampleConfig, ServeConfig
from hetlm.errors import HetlmError
from hetlm.planner import Plan
from hetlm.reporting import NullReporter, Reporter
from hetlm.sampling import Sampler
from hetlm.serve.engine import Engine, Event, GenerationParams, Job, Piece
from hetlm.serve.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    RequestLimits,
    SamplingRequest,
    chat_params,
    completion_params,
    engine_error,
    full_response,
    invalid,
    model_card,
    parse_body,
    response_meta,
    sse_stream,
)
from hetlm.store import LoadedModel
from hetlm.tokenizer import Tokenizer

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Settings:
    model_name: str
    api_key: str | None
    serve: ServeConfig
    sample: SampleConfig


def create_app(loaded: LoadedModel, plan: Plan, serve: ServeConfig | None = None, sample: SampleConfig | None = None,
               api_key: str | None = None, model_name: str | None = None, tokenizer: Any = None) -> FastAPI:
    """The FastAPI app serving ``loaded`` (already on ``plan``'s device); the engine runs while the app does."""
    if tokenizer is None:
        tokenizer = Tokenizer.load(loaded.tokenizer_path)
    settings = Settings(model_name or loaded.config.name, api_key or None, serve or loaded.config.serve,
                        sample or loaded.config.sample)
    engine = Engine(Sampler(loaded.model, tokenizer, plan), settings.serve.max_concurrency, settings.serve.max_queue)
    limits = RequestLimits(settings.sample, settings.serve.max_tokens_limit, loaded.config.model.context_length,
                           loaded.config.model.vocab_size)
    created = int(time.time())
    key_digest = hashlib.sha256(settings.api_key.encode("utf-8")).digest() if settings.api_key else b""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="hetlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return _error_response(ApiError(exc.status_code, message, code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(invalid(f"invalid request: {exc.errors()[0].get('msg', 'bad input')}"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", "missing_api_key")
        # Digests have one length whatever the key's, so the comparison leaks neither content nor length.
        given = hashlib.sha256(token.strip().encode("utf-8")).digest()
        if not hmac.compare_digest(given, key_digest):
            raise ApiError(401, "invalid API key", "invalid_api_key")

    async def read_body(request: Request, schema: type[SamplingRequest]) -> Any:
        authorize(request)
        body = bytearray()
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            # Past the limit the rest is read and dropped, so the client finishes sending and sees the 413.
            if size <= MAX_BODY_BYTES:
                body += chunk
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", "body_too_large")
        parsed = parse_body(bytes(body), schema)
        if parsed.model != settings.model_name:
            raise ApiError(404, f"model {parsed.model!r} does not exist; this server serves {settings.model_name!r}",
                           "model_not_found", "model")
        return parsed

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "device": plan.device, "decode_weights": plan.decode_weights,
                "in_flight": engine.in_flight, "capacity": engine.capacity, **engine.stats}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card(settings.model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name != settings.model_name:
            raise ApiError(404, f"model {name!r} does not exist", "model_not_found", "model")
        return model_card(name, created)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionRequest = await read_body(request, CompletionRequest)
        return await _respond(engine, completion_params(body, tokenizer, limits), body, settings, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatRequest = await read_body(request, ChatRequest)
        return await _respond(engine, chat_params(body, tokenizer, limits), body, settings, chat=True)

    return app


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


class _LoopListener:
    """A job's listener that puts the engine thread's events on this event loop's queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        # Raises RuntimeError once the loop is closed; the engine then cancels the job.
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def steps(self) -> AsyncIterator[list[Piece]]:
        """The job's pieces as they come; pieces that piled up while the loop was busy arrive merged, one per
        choice, so a loaded server sends fewer, larger chunks instead of falling further behind."""
        while True:
            events = [await self.queue.get()]
            while not self.queue.empty():
                events.append(self.queue.get_nowait())
            merged: dict[int, Piece] = {}
            for event in events:
                if event.kind == "error":
                    raise engine_error(event.error)
                for piece in event.pieces:
                    seen = merged.get(piece.index)
                    merged[piece.index] = piece if seen is None else Piece(
                        piece.index, seen.text + piece.text, seen.tokens + piece.tokens, piece.finish_reason)
            if merged:
                yield list(merged.values())
            if events[-1].kind == "done":
                return


async def _respond(engine: Engine, params: GenerationParams, body: SamplingRequest, settings: Settings, chat: bool) -> Any:
    listener = _LoopListener()
    job = Job(params, listener)
    if not engine.submit(job):
        raise ApiError(503, "the server is at capacity; retry shortly", "server_busy", kind="server_error")
    meta = response_meta(settings.model_name, chat)
    if body.stream:
        usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(sse_stream(listener.steps(), params, meta, chat, usage_chunk), job)
    try:
        return await full_response(listener.steps(), params, meta, chat)
    finally:
        job.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events whose generation is cancelled however the response ends (a disconnect included)."""

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


# --- running it ------------------------------------------------------------------------------------


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning to show when the server is reachable beyond this machine without a key."""
    if api_key or host in LOOPBACK_HOSTS:
        return None
    return (f"serving on {host} without an API key: anyone who can reach this port can use the model "
            "(set --api-key or HETLM_API_KEY)")


def run_server(app: FastAPI, host: str, port: int, reporter: Reporter = NullReporter()) -> None:
    """Serve ``app`` with uvicorn on ``host:port`` until interrupted."""
    warning = bind_warning(host, app.state.settings.api_key)
    if warning:
        reporter.warning(warning)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        # Bound here rather than by uvicorn so a busy port is one clear error, and port 0 reports its pick.
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise HetlmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    reporter.info(f"serving {app.state.settings.model_name} on http://{shown}:{port}/v1 (Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
