"""``hetlm serve``: an OpenAI-compatible HTTP API over one loaded model.

Requests are parsed and checked on the event loop, then queued for one engine thread that owns the
model. The engine keeps up to ``max_concurrency`` generations active and advances them in turn, one
step each, so model access is serialised, every client streams at a fair share, and a cancelled
generation (a streaming client that went away) stops at its next step. Requests beyond the active
ones wait in a bounded queue; past that the server answers 503 instead of piling up work.

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
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetlm.chat import CHAT_ROLES, CHAT_STOP, render_chat
from hetlm.checkpoint import LoadedModel
from hetlm.config import SampleConfig, ServeConfig
from hetlm.errors import HetlmError
from hetlm.planner import Plan
from hetlm.reporting import NullReporter, Reporter
from hetlm.sampling import Sampler, SamplingSettings, encode_prompt, make_generator

# Choices (prompts x n) one request may ask for, and stop strings (OpenAI allows 4).
MAX_CHOICES = 16
MAX_STOP = 4
MAX_BODY_BYTES = 4 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        if self.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code, param)


# --- request bodies --------------------------------------------------------------------------------


class _Body(BaseModel):
    # Unknown parameters are errors, and types are not coerced ("5" is not a number).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    # An extension to OpenAI's API: keep only the k most likely tokens (0 = off).
    top_k: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI parameters this server accepts only at their neutral values.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    error = exc.errors()[0]
    # Union members add their type to the location ("prompt.list[int].0"); only field names and indices help.
    parts = [str(p) for p in error["loc"]
             if isinstance(p, int) or not (p in _TYPE_TAGS or "[" in p or p[:1].isupper() or "-" in p)]
    where = ".".join(parts)
    param = parts[0] if parts else None
    if error["type"] == "extra_forbidden":
        return f"unknown parameter {where!r}", param
    if error["type"] == "missing":
        return f"missing required parameter {where!r}", param
    if param == "prompt":
        return "prompt must be a string, a list of strings, a list of token ids or a list of such lists", param
    return f"invalid value for {where!r}: {error['msg']}", param


# --- the engine ------------------------------------------------------------------------------------


# The sampler's "eos" is OpenAI's "stop" (the model ended the text).
_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
# What one engine step produced for one choice: (choice index, new text, new tokens, finish reason or None).
Step = tuple[int, str, int, Union[str, None]]


@dataclass
class Params:
    """What one request asks the model for, checked and tokenized."""

    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: list[str]
    seed: int
    n: int


@dataclass
class Job:
    """One request's generations, handed from the event loop to the engine thread and back."""

    params: Params
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps: Iterator[list[Step]] | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:
            # The event loop is gone (server shut down): nobody is listening any more.
            self.cancel()


class Engine:
    """Owns the model; runs queued jobs on one thread, stepping up to ``max_active`` of them in turn."""

    def __init__(self, loaded: LoadedModel, tokenizer: Any, plan: Plan, max_active: int, max_waiting: int) -> None:
        self.loaded, self.plan = loaded, plan
        self.sampler = Sampler(loaded.model, tokenizer, plan)
        self.max_active, self.capacity = max_active, max_active + max_waiting
        # Held while the model runs a step; anything else in this process that uses the model takes it too.
        self.lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        # Jobs being generated; only the engine thread changes it, others may read a snapshot.
        self.active: list[Job] = []
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0}
        self._in_flight = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hetlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the server is saturated."""
        with self._cond:
            if self._stopping or self._in_flight >= self.capacity:
                return False
            self._in_flight += 1
            self._waiting.append(job)
            self._cond.notify()
        return True

    def _run(self) -> None:
        active = self.active
        while True:
            with self._cond:
                while not self._stopping and not active and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    leftover = active + list(self._waiting)
                    self._waiting.clear()
                    break
                while self._waiting and len(active) < self.max_active:
                    active.append(self._waiting.popleft())
            for job in list(active):
                outcome = self._step(job)
                if outcome is not None:
                    active.remove(job)
                    with self._cond:
                        self._in_flight -= 1
                        self.stats[outcome] += 1
        for job in leftover:
            job.emit(("error", ApiError(503, "the server is shutting down", "shutting_down", kind="server_error")))

    def _step(self, job: Job) -> str | None:
        """Advance ``job`` by one step; once it is over, say how: completed, cancelled or failed."""
        if job.cancelled.is_set():
            if job.steps is not None:
                job.steps.close()
            return "cancelled"
        try:
            with self.lock:
                if job.steps is None:
                    job.steps = self._generate(job.params)
                events = next(job.steps)
        except StopIteration:
            job.emit(("done", None))
            return "completed"
        except Exception as exc:  # one failed generation must not take the server down
            job.emit(("error", exc))
            return "failed"
        job.emit(("tokens", events))
        return None

    def _generate(self, params: Params) -> Iterator[list[Step]]:
        """Steps of (choice index, new text, new tokens, finish reason or None): one sampled token per
        unfinished choice of one prompt per step; the prompts of a request run one after another."""
        settings = SamplingSettings(max_new_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                                    top_p=params.top_p, stop=tuple(params.stop), num_samples=params.n)
        generator = make_generator(params.seed, self.sampler.device)
        for p, prompt in enumerate(params.prompts):
            generation = self.sampler.stream(prompt, settings, generator)
            try:
                unfinished = params.n
                while unfinished:
                    # The sampler yields one chunk per unfinished sample for each token it samples.
                    step = []
                    for _ in range(unfinished):
                        chunk = next(generation)
                        finish = None if chunk.finish_reason is None else _FINISH_REASONS[chunk.finish_reason]
                        step.append((p * params.n + chunk.index, chunk.text, len(chunk.token_ids), finish))
                        unfinished -= finish is not None
                    yield step
            finally:
                generation.close()


# --- the app ---------------------------------------------------------------------------------------


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
        from hetlm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(loaded.tokenizer_path)
    settings = Settings(model_name or loaded.config.name, api_key or None, serve or loaded.config.serve,
                        sample or loaded.config.sample)
    engine = Engine(loaded, tokenizer, plan, settings.serve.max_concurrency, settings.serve.max_queue)
    created = int(time.time())
    context = loaded.config.model.context_length
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
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return ApiError(exc.status_code, message, code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(f"invalid request: {exc.errors()[0].get('msg', 'bad input')}").response()

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

    async def read_json(request: Request, schema: type[BaseModel]) -> Any:
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
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise invalid(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise invalid("the body must be a JSON object", code="invalid_json")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise invalid(message, param) from None
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
        return {"object": "list", "data": [_model_card(settings.model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name != settings.model_name:
            raise ApiError(404, f"model {name!r} does not exist", "model_not_found", "model")
        return _model_card(name, created)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionRequest = await read_json(request, CompletionRequest)
        _refuse_unsupported(body, {"echo": False, "logprobs": None, "suffix": None})
        if body.best_of is not None and body.best_of != body.n:
            raise invalid("best_of is not supported (leave it out or equal to n)", "best_of", "unsupported_parameter")
        prompts = _completion_prompts(body.prompt, tokenizer, loaded.config.model.vocab_size)
        params = _params(body, prompts, body.max_tokens, [], settings, context)
        return await _respond(engine, params, body, settings, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatRequest = await read_json(request, ChatRequest)
        _refuse_unsupported(body, {"logprobs": False, "top_logprobs": None})
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise invalid("give max_tokens or max_completion_tokens, not both", "max_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prompt = render_chat(_chat_messages(body.messages))
        params = _params(body, [encode_prompt(tokenizer, prompt)], max_tokens, CHAT_STOP, settings, context)
        return await _respond(engine, params, body, settings, chat=True)

    return app


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "hetlm"}


def _refuse_unsupported(body: _Sampling, neutral: dict[str, Any]) -> None:
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, **neutral}
    for name, value in neutral.items():
        if getattr(body, name) != value:
            raise invalid(f"{name} is not supported by this server", name, "unsupported_parameter")
    if body.logit_bias:
        raise invalid("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")


def _completion_prompts(prompt: Any, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    if isinstance(prompt, str):
        return [encode_prompt(tokenizer, prompt)]
    if not prompt:
        raise invalid("prompt must not be an empty list", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [encode_prompt(tokenizer, p) for p in prompt]
    prompts = [prompt] if all(isinstance(p, int) for p in prompt) else prompt
    for ids in prompts:
        if not ids:
            raise invalid("a token prompt must not be empty", "prompt")
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    return [list(ids) for ids in prompts]


def _chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    if not messages:
        raise invalid("messages must not be empty", "messages")
    rendered = []
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}", "messages")
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        rendered.append({"role": message.role, "content": content or ""})
    return rendered


def _params(body: _Sampling, prompts: list[list[int]], max_tokens: int | None, extra_stop: list[str],
            settings: Settings, context: int) -> Params:
    sample = settings.sample
    if not 1 <= body.n <= MAX_CHOICES:
        raise invalid(f"n must be between 1 and {MAX_CHOICES}", "n")
    if len(prompts) * body.n > MAX_CHOICES:
        raise invalid(f"prompts x n must be at most {MAX_CHOICES}, got {len(prompts)} x {body.n}", "n")
    temperature = sample.temperature if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise invalid("temperature must be between 0 and 2", "temperature")
    top_p = sample.top_p if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise invalid("top_p must be in (0, 1]", "top_p")
    top_k = sample.top_k if body.top_k is None else body.top_k
    if top_k < 0:
        raise invalid("top_k must be >= 0 (0 = off)", "top_k")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise invalid(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings", "stop")
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise invalid("seed must fit in 64 bits", "seed")
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise invalid(f"the prompt is {longest} tokens but the model's context is {context} tokens",
                      "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = sample.max_new_tokens
    elif not 1 <= max_tokens <= settings.serve.max_tokens_limit:
        raise invalid(f"max_tokens must be between 1 and {settings.serve.max_tokens_limit}", "max_tokens")
    stop += [s for s in extra_stop if s not in stop]
    return Params(prompts, max_tokens, temperature, top_k, top_p, stop, seed, body.n)


async def _respond(engine: Engine, params: Params, body: _Sampling, settings: Settings, chat: bool) -> Any:
    job = Job(params, asyncio.get_running_loop())
    if not engine.submit(job):
        raise ApiError(503, "the server is at capacity; retry shortly", "server_busy", kind="server_error")
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
            "model": settings.model_name}
    usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        return _EventStream(_sse(job, meta, chat, usage_chunk), job)
    try:
        choices = [{"text": "", "finish_reason": None, "tokens": 0} for _ in range(len(params.prompts) * params.n)]
        async for steps in _events(job):
            for index, text, tokens, finish in steps:
                choices[index]["text"] += text
                choices[index]["tokens"] += tokens
                choices[index]["finish_reason"] = finish or choices[index]["finish_reason"]
    finally:
        job.cancel()
    return _full_response(meta, chat, choices, params)


async def _events(job: Job) -> AsyncIterator[list[Step]]:
    """The job's steps as they come; steps that piled up while the loop was busy arrive merged, one entry per
    choice, so a loaded server sends fewer, larger chunks instead of falling further behind."""
    while True:
        items = [await job.events.get()]
        while not job.events.empty():
            items.append(job.events.get_nowait())
        merged: dict[int, Step] = {}
        for kind, payload in items:
            if kind == "error":
                if isinstance(payload, ApiError):
                    raise payload
                raise ApiError(500, f"generation failed: {type(payload).__name__}: {payload}", "generation_failed",
                               kind="server_error")
            if kind == "tokens":
                for index, text, tokens, finish in payload:
                    _, seen, counted, _ = merged.get(index, (index, "", 0, None))
                    merged[index] = (index, seen + text, counted + tokens, finish)
        if merged:
            yield list(merged.values())
        if items[-1][0] == "done":
            return


def _usage(params: Params, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in params.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _full_response(meta: dict[str, Any], chat: bool, choices: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    usage = _usage(params, sum(c["tokens"] for c in choices))
    if chat:
        out = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                "finish_reason": c["finish_reason"] or "length"} for i, c in enumerate(choices)]
        return {**meta, "object": "chat.completion", "choices": out, "usage": usage}
    out = [{"index": i, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"] or "length"}
           for i, c in enumerate(choices)]
    return {**meta, "object": "text_completion", "choices": out, "usage": usage}


async def _sse(job: Job, meta: dict[str, Any], chat: bool, usage_chunk: bool) -> AsyncIterator[str]:
    """SSE lines of one job. With stream_options.include_usage, usage comes in a last chunk with no choices
    (as OpenAI does); otherwise it rides on the chunk that finishes the last choice."""
    params = job.params
    count = len(params.prompts) * params.n
    tokens = 0
    unfinished = set(range(count))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        return "data: " + json.dumps({**meta, "object": kind, "choices": choices, "usage": usage}) + "\n\n"

    def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    try:
        if chat:
            yield chunk([choice(i, "", None, role=True) for i in range(count)])
        async for steps in _events(job):
            out = []
            for index, text, new_tokens, finish in steps:
                tokens += new_tokens
                if finish is not None:
                    unfinished.discard(index)
                if text or finish is not None:
                    out.append(choice(index, text or (None if chat else ""), finish))
            if out:
                last = not unfinished and not usage_chunk
                yield chunk(out, _usage(params, tokens) if last else None)
        if unfinished:
            yield chunk([choice(i, None if chat else "", "length") for i in sorted(unfinished)],
                        None if usage_chunk else _usage(params, tokens))
        if usage_chunk:
            yield chunk([], _usage(params, tokens))
    except ApiError as exc:
        yield "data: " + json.dumps({"error": {"message": exc.message, "type": exc.kind, "param": None,
                                               "code": exc.code}}) + "\n\n"
    yield "data: [DONE]\n\n"


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
    import socket

    import uvicorn

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
