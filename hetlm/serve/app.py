"""The FastAPI application of ``hetlm serve``, and ``run_server`` to serve it with uvicorn.

Requests are read and authorised on the event loop; their bodies are parsed and their prompts tokenised on a
worker thread (``hetlm.serve.protocol`` checks cheap bounds first), so a huge prompt stalls no other stream. Then
they are handed as jobs to the engine (``hetlm.serve.engine``), whose thread owns the model and runs one
continuous batch; its events come back onto the loop through a queue. A request the engine has no room for is
answered 503. A client that disconnects cancels its job, streaming or not: the engine frees its slots at the
next step.

Endpoints: ``GET /health`` (no key), ``GET /metrics`` (Prometheus), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``. Chat messages go through ``hetlm.chat.render_chat``. Sampling is
``hetlm.sampling``'s: a prompt must fit the context, but ``max_tokens`` may run past it (the window slides).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from hetlm.config import SampleConfig, ServeConfig
from hetlm.errors import HetlmError
from hetlm.planner import Plan, serving_slots
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
    prompt_char_limit,
    response_meta,
    sse_stream,
)
from hetlm.store import LoadedModel
from hetlm.tokenizer import Tokenizer

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# A request line and headers larger than this are refused (h11's limit on an incomplete event).
MAX_HEADER_BYTES = 32 << 10
# The status counted for a request whose client left before its answer (nginx's convention).
CLIENT_GONE = 499
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Settings:
    model_name: str
    api_key: str | None
    serve: ServeConfig
    sample: SampleConfig


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process do not collide)."""

    def __init__(self, engine: Engine) -> None:
        registry = self.registry = CollectorRegistry()
        self.requests = Counter("hetlm_requests", f"HTTP requests answered, by endpoint and status ({CLIENT_GONE}: the "
                                "client left before the answer)", ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("hetlm_prompt_tokens", "Prompt tokens of the requests the engine took",
                                     registry=registry)
        self.completion_tokens = Counter("hetlm_completion_tokens", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram("hetlm_time_to_first_token_seconds", "From a completed generation "
                                             "request's arrival to its first token", buckets=TIME_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram("hetlm_time_per_output_token_seconds", "Mean time between a completed "
                                               "request's tokens after the first (per choice)", buckets=TOKEN_BUCKETS,
                                               registry=registry)
        self.request_latency = Histogram("hetlm_request_latency_seconds", "From a completed generation request's arrival "
                                         "to its last token", buckets=TIME_BUCKETS, registry=registry)
        gauges = {"hetlm_queue_depth": ("Requests waiting for slots", lambda: engine.waiting),
                  "hetlm_requests_running": ("Requests with sequences in the batch", lambda: len(engine.active)),
                  "hetlm_slots_active": ("KV-cache slots in use", lambda: engine.slots_in_use),
                  "hetlm_slots": ("KV-cache slots: the sequences generated at once", lambda: engine.slots)}
        for name, (meaning, read) in gauges.items():
            Gauge(name, meaning, registry=registry).set_function(read)

    def finish(self, params: GenerationParams, tracker: _Tracker) -> None:
        """Account for a request the engine took, however it ended; only completed ones are timed."""
        self.prompt_tokens.inc(sum(len(p) for p in params.prompts))
        self.completion_tokens.inc(tracker.tokens)
        if tracker.completed and tracker.first is not None:
            self.time_to_first_token.observe(tracker.first - tracker.arrived)
            self.request_latency.observe(tracker.last - tracker.arrived)
            steps = max(tracker.per_choice.values())
            if steps > 1:
                self.time_per_output_token.observe((tracker.last - tracker.first) / (steps - 1))


class _Tracker:
    """Follows one request's output for the metrics: when its first and last tokens came, and how many."""

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.first: float | None = None
        self.last = arrived
        self.tokens = 0
        self.per_choice: dict[int, int] = {0: 0}
        self.completed = False

    async def follow(self, steps: AsyncIterator[list[Piece]]) -> AsyncIterator[list[Piece]]:
        async for pieces in steps:
            now = time.perf_counter()
            for piece in pieces:
                self.tokens += piece.tokens
                self.per_choice[piece.index] = self.per_choice.get(piece.index, 0) + piece.tokens
            if self.first is None and self.tokens:
                self.first = now
            self.last = now
            yield pieces
        self.completed = True


class _CountRequests:
    """Counts every HTTP request by endpoint and the status it was answered with. Plain ASGI: it sees the status
    of streamed responses too, and leaves the body and the disconnect messages alone."""

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def counted(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            status = status or 500
            raise
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
            self.counter.labels(endpoint, str(status or CLIENT_GONE)).inc()


class _LimitHeaders:
    """Answers 431 to a request whose headers are over ``MAX_HEADER_BYTES``: h11 bounds a head only while it is
    incomplete, so one that arrived in a single read would pass."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            error = ApiError(431, f"the request headers are over {MAX_HEADER_BYTES} bytes", "headers_too_large")
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(loaded: LoadedModel, plan: Plan, serve: ServeConfig | None = None, sample: SampleConfig | None = None,
               api_key: str | None = None, model_name: str | None = None, tokenizer: Any = None) -> FastAPI:
    """The FastAPI app serving ``loaded`` (already on ``plan``'s device); the engine runs while the app does.

    ``serve.max_concurrency`` slots (auto: as many as the planner finds room for) are generated at once."""
    if tokenizer is None:
        tokenizer = Tokenizer.load(loaded.tokenizer_path)
    settings = Settings(model_name or loaded.config.name, api_key or None, serve or loaded.config.serve,
                        sample or loaded.config.sample)
    config = dataclasses.replace(loaded.config, serve=settings.serve)
    slots, slots_why = serving_slots(config, plan.inventory, plan.device, plan.decode_weights)
    sampler = Sampler(loaded.model, tokenizer, plan)
    # What the weights hold on each device, beside the plan's figure: fixed once the sampler has prepared its copies.
    weights = {device: {"in_use": used, "planned": next((m.weights for m in plan.memory if m.device == device), 0)}
               for device, used in plan.weights_in_use(loaded.model, sampler.decoder).items()}
    engine = Engine(sampler, slots, settings.serve.max_queue,
                    batching=settings.serve.batching == "on")
    context = loaded.config.model.context_length
    limits = RequestLimits(settings.sample, settings.serve.max_tokens_limit, context, loaded.config.model.vocab_size,
                           prompt_char_limit(tokenizer, context), slots)
    metrics = Metrics(engine)
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
    app.add_middleware(_LimitHeaders)
    app.add_middleware(_CountRequests, counter=metrics.requests)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.slots_reason = slots_why

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(exc)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return _error_response(ApiError(exc.status_code, message, code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
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

    async def read_body(request: Request) -> bytes:
        authorize(request)
        too_large = ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", "body_too_large")
        declared = request.headers.get("content-length", "")
        # Refused from the header, before a byte of it is read (h11 has already checked it is a number).
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                # A chunked body is cut off here; uvicorn drops what the client still sends.
                raise too_large
        return bytes(body)

    def job(raw: bytes, schema: type[SamplingRequest], params: Callable[..., GenerationParams]) -> tuple[Any, GenerationParams]:
        """The request's body and its job: run on a worker thread, as parsing and tokenising may take a while."""
        body = parse_body(raw, schema)
        if body.model != settings.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                           "model_not_found", "model")
        return body, params(body, tokenizer, limits)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "device": plan.device, "decode_weights": plan.decode_weights,
                "in_flight": engine.in_flight, "capacity": engine.capacity, **engine.stats,
                "slots": engine.slots, "slots_in_use": engine.slots_in_use, "batching": settings.serve.batching,
                "weights_bytes": weights}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
        arrived = time.perf_counter()
        body, params = await run_in_threadpool(job, await read_body(request), CompletionRequest, completion_params)
        return await _respond(request, engine, metrics, params, body, settings, arrived, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        arrived = time.perf_counter()
        body, params = await run_in_threadpool(job, await read_body(request), ChatRequest, chat_params)
        return await _respond(request, engine, metrics, params, body, settings, arrived, chat=True)

    return app


def _error_response(exc: ApiError) -> Response:
    # ASCII JSON: a message that quotes the request (a lone surrogate included) always encodes.
    return Response(json.dumps(exc.body), status_code=exc.status, headers=exc.headers, media_type="application/json")


class _Mailbox:
    """Carries events from the engine thread onto one event loop, waking the loop once for all the events posted
    since it last woke rather than once per event: each step of the batch has news for every request in it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.posted: list[tuple[asyncio.Queue[Event], Event]] = []

    def post(self, queue: asyncio.Queue[Event], event: Event) -> None:
        with self.lock:
            self.posted.append((queue, event))
            if len(self.posted) > 1:
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            # The loop has closed: nobody will read these. The engine cancels the job that posted last.
            with self.lock:
                self.posted.clear()
            raise

    def _deliver(self) -> None:
        with self.lock:
            posted, self.posted = self.posted, []
        for queue, event in posted:
            queue.put_nowait(event)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


class _LoopListener:
    """A job's listener that puts the engine thread's events on this event loop's queue."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.mailbox = _mailboxes.get(loop) or _mailboxes.setdefault(loop, _Mailbox(loop))
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.mailbox.post(self.queue, event)

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


async def _respond(request: Request, engine: Engine, metrics: Metrics, params: GenerationParams, body: SamplingRequest,
                   settings: Settings, arrived: float, chat: bool) -> Any:
    listener = _LoopListener()
    job = Job(params, listener)
    if not engine.submit(job):
        raise ApiError(503, "the server is at capacity; retry shortly", "server_busy", kind="server_error")
    tracker = _Tracker(arrived)
    steps = tracker.follow(listener.steps())
    meta = response_meta(settings.model_name, chat)
    if body.stream:
        usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(sse_stream(steps, params, meta, chat, usage_chunk), job, lambda: metrics.finish(params, tracker))
    answer = asyncio.ensure_future(full_response(steps, params, meta, chat))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            return answer.result()
        return Response(status_code=CLIENT_GONE)
    finally:
        job.cancel()
        for task in (answer, gone):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        metrics.finish(params, tracker)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone. The body is read by then, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events whose generation is cancelled however the response ends (a disconnect included)."""

    def __init__(self, content: AsyncIterator[str], job: Job, finished: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.finished = job, finished

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            self.finished()


# --- running it ------------------------------------------------------------------------------------


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning to show when the server is reachable beyond this machine without a key."""
    if api_key or host in LOOPBACK_HOSTS:
        return None
    return (f"serving on {host} without an API key: anyone who can reach this port can use the model "
            "(set HETLM_API_KEY or --api-key-file)")


def _h11_with_header_timeout(seconds: float) -> type[H11Protocol]:
    class HeaderTimeoutH11(H11Protocol):
        """uvicorn's h11 protocol with a deadline for each request head, counted from when the connection is ready for
        one: uvicorn times idle connections out only after a first response, so a connection that never sends (or
        never finishes) a request head would hold its place among serve.max_connections for ever."""

        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_too_slow)

        def _head_too_slow(self) -> None:
            self._head_timer = None
            # A request whose head came in time is running: its own response re-arms the deadline.
            if self.cycle is None or self.cycle.response_complete:
                self.timeout_keep_alive_handler()

    return HeaderTimeoutH11


def server_config(app: FastAPI) -> uvicorn.Config:
    """uvicorn's configuration for ``app``, with the limits of its serve section: the idle keep-alive timeout, a
    deadline and a size bound for request heads, and the most connections open at once."""
    serve: ServeConfig = app.state.settings.serve
    return uvicorn.Config(app, log_level="warning", access_log=False, http=_h11_with_header_timeout(serve.header_timeout),
                          timeout_keep_alive=serve.keep_alive_timeout, limit_concurrency=serve.max_connections,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)


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
    server = uvicorn.Server(server_config(app))
    server.run(sockets=[sock])
