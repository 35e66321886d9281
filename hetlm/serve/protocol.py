"""OpenAI's API as this server speaks it: request bodies, their parameters, responses and stream chunks.

Sampling parameters are checked by ``SamplingSettings``, as everywhere else; this module adds only the
API's own caps (``MAX_TEMPERATURE``, ``serve.max_tokens_limit``, ``MAX_CHOICES``, ``MAX_STOP``, the seed's
range, ``n`` within the server's slots) and the prompt's fit in the context, checked in characters before it is
tokenised and in tokens after. No I/O and no web framework: ``hetlm.serve.app`` reads the
requests and sends what this module builds.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from hetlm.chat import CHAT_ROLES, CHAT_STOP, render_chat
from hetlm.config import SampleConfig
from hetlm.errors import UsageError
from hetlm.sampling import encode_prompt
from hetlm.sampling_settings import SamplingError, SamplingSettings
from hetlm.serve.engine import EngineStopped, GenerationParams, Piece

# Choices (prompts x n) one request may ask for, and stop strings (OpenAI allows 4).
MAX_CHOICES = 16
MAX_STOP = 4
# OpenAI's upper limit; the sampler itself takes any finite temperature.
MAX_TEMPERATURE = 2.0
MAX_BODY_BYTES = 4 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
# The API's names for the sampling settings it calls otherwise.
API_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}
# The sampler's "eos" is OpenAI's "stop" (the model ended the text).
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    @property
    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @property
    def headers(self) -> dict[str, str] | None:
        if self.status == 503:
            return {"Retry-After": "1"}
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        return None


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code, param)


def engine_error(error: Exception) -> ApiError:
    """The answer for a job the engine could not finish."""
    if isinstance(error, EngineStopped):
        return ApiError(503, "the server is shutting down", "shutting_down", kind="server_error")
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "generation_failed", kind="server_error")


# --- request bodies --------------------------------------------------------------------------------


class _Body(BaseModel):
    # Unknown parameters are errors, and types are not coerced ("5" is not a number).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    """The parameters both endpoints take."""

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


class CompletionRequest(SamplingRequest):
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


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


def parse_body(raw: bytes, schema: type[_Body]) -> Any:
    """A request body, read as JSON and checked against ``schema``."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise invalid(message, param) from None


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
    if not where:
        return f"invalid request body: {error['msg']}", param
    return f"invalid value for {where!r}: {error['msg']}", param


# --- request parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLimits:
    """What a request's parameters are checked against, and what it gets for those it leaves out."""

    sample: SampleConfig
    max_tokens_limit: int
    context_length: int
    vocab_size: int
    # A text prompt longer than this has more tokens than the context (no token is longer than the tokenizer's
    # longest piece), so it is refused before anything is tokenised.
    max_prompt_chars: int
    # Samples of one prompt share a prefill and run at once, a slot each.
    max_samples: int


def prompt_char_limit(tokenizer: Any, context_length: int) -> int:
    """``RequestLimits.max_prompt_chars`` for ``tokenizer``: its pieces' longest text (a byte piece's name is longer
    than the byte it stands for) times the context."""
    return context_length * max(len(tokenizer.id_to_piece(i)) for i in range(tokenizer.vocab_size))


def completion_params(body: CompletionRequest, tokenizer: Any, limits: RequestLimits) -> GenerationParams:
    """The job of a completion request. Cheap checks (parameters, counts, lengths in characters) come before any
    tokenising, so an oversized request costs next to nothing to refuse; call it off the event loop all the same."""
    _refuse_unsupported(body, {"echo": False, "logprobs": None, "suffix": None})
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("best_of is not supported (leave it out or equal to n)", "best_of", "unsupported_parameter")
    prompt = body.prompt
    if isinstance(prompt, list) and not prompt:
        raise invalid("prompt must not be an empty list", "prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
    tokens = None if texts is not None else [prompt] if isinstance(prompt[0], int) else prompt
    settings, seed = _settings(body, body.max_tokens, [], limits, len(texts if texts is not None else tokens))
    if texts is not None:
        prompts = [_encode(tokenizer, text, limits) for text in texts]
    else:
        for ids in tokens:
            if not ids:
                raise invalid("a token prompt must not be empty", "prompt")
            bad = next((i for i in ids if not 0 <= i < limits.vocab_size), None)
            if bad is not None:
                raise invalid(f"token id {bad} is outside the vocabulary (0..{limits.vocab_size - 1})", "prompt")
            _fits(len(ids), limits)
        prompts = [list(ids) for ids in tokens]
    return GenerationParams(prompts, settings, seed)


def chat_params(body: ChatRequest, tokenizer: Any, limits: RequestLimits) -> GenerationParams:
    """The job of a chat request; like ``completion_params``, cheap checks first."""
    _refuse_unsupported(body, {"logprobs": False, "top_logprobs": None})
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise invalid("give max_tokens or max_completion_tokens, not both", "max_tokens")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    settings, seed = _settings(body, max_tokens, CHAT_STOP, limits, 1)
    prompt = render_chat(_chat_messages(body.messages))
    return GenerationParams([_encode(tokenizer, prompt, limits, "messages")], settings, seed)


def _encode(tokenizer: Any, text: str, limits: RequestLimits, param: str = "prompt") -> list[int]:
    if len(text) > limits.max_prompt_chars:
        raise invalid(f"the prompt has {len(text)} characters, more than the model's context of {limits.context_length} "
                      f"tokens can hold (at most {limits.max_prompt_chars})", param, "context_length_exceeded")
    try:
        ids = encode_prompt(tokenizer, text)
    except UsageError as exc:
        raise invalid(str(exc), param) from None
    _fits(len(ids), limits, param)
    return ids


def _fits(length: int, limits: RequestLimits, param: str = "prompt") -> None:
    if length > limits.context_length:
        raise invalid(f"the prompt is {length} tokens but the model's context is {limits.context_length} tokens",
                      param, "context_length_exceeded")


def _refuse_unsupported(body: SamplingRequest, neutral: dict[str, Any]) -> None:
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, **neutral}
    for name, value in neutral.items():
        if getattr(body, name) != value:
            raise invalid(f"{name} is not supported by this server", name, "unsupported_parameter")
    if body.logit_bias:
        raise invalid("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")


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


def _settings(body: SamplingRequest, max_tokens: int | None, extra_stop: list[str], limits: RequestLimits,
              prompts: int) -> tuple[SamplingSettings, int]:
    """The sampling settings and seed of a request with ``prompts`` prompts."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise invalid(f"stop must be a string or a list of at most {MAX_STOP} strings, got {len(stop)}", "stop")
    try:
        settings = SamplingSettings.from_config(
            limits.sample, max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            stop=stop + [s for s in extra_stop if s not in stop], num_samples=body.n)
    except SamplingError as exc:
        param = API_NAMES.get(exc.name, exc.name)
        raise invalid(exc.message(param), param) from None
    if settings.temperature > MAX_TEMPERATURE:
        raise invalid(f"temperature must be at most {MAX_TEMPERATURE:g} here, got {settings.temperature!r}", "temperature")
    # Only a client's max_tokens is capped: the server's own sample.max_new_tokens applies as configured.
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise invalid(f"max_tokens must be at most {limits.max_tokens_limit} on this server, got {max_tokens}", "max_tokens")
    most = min(MAX_CHOICES, limits.max_samples)
    if body.n > most:
        why = "" if most == MAX_CHOICES else f" (the server generates {limits.max_samples} sequences at once)"
        raise invalid(f"n must be at most {most} here{why}, got {body.n}", "n")
    if prompts * body.n > MAX_CHOICES:
        param = "n" if body.n > 1 else "prompt"
        raise invalid(f"prompts x n must be at most {MAX_CHOICES}, got {prompts} x {body.n}", param)
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise invalid("seed must fit in 64 bits", "seed")
    return settings, seed


# --- responses -------------------------------------------------------------------------------------


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "hetlm"}


def response_meta(model_name: str, chat: bool) -> dict[str, Any]:
    """The fields every response and stream chunk of one request shares."""
    return {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
            "model": model_name}


def _finish(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS[reason]


def _usage(params: GenerationParams, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in params.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def full_response(steps: AsyncIterator[list[Piece]], params: GenerationParams, meta: dict[str, Any],
                        chat: bool) -> dict[str, Any]:
    """The whole response of a request that did not ask to stream, once ``steps`` (the job's output) ends."""
    choices = [{"text": "", "finish_reason": None, "tokens": 0} for _ in range(params.choices)]
    async for pieces in steps:
        for piece in pieces:
            choice = choices[piece.index]
            choice["text"] += piece.text
            choice["tokens"] += piece.tokens
            choice["finish_reason"] = _finish(piece.finish_reason) or choice["finish_reason"]
    usage = _usage(params, sum(c["tokens"] for c in choices))
    if chat:
        out = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                "finish_reason": c["finish_reason"] or "length"} for i, c in enumerate(choices)]
        return {**meta, "object": "chat.completion", "choices": out, "usage": usage}
    out = [{"index": i, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"] or "length"}
           for i, c in enumerate(choices)]
    return {**meta, "object": "text_completion", "choices": out, "usage": usage}


async def sse_stream(steps: AsyncIterator[list[Piece]], params: GenerationParams, meta: dict[str, Any], chat: bool,
                     usage_chunk: bool) -> AsyncIterator[str]:
    """Server-sent event lines of one request's output. With stream_options.include_usage, usage comes in a last
    chunk with no choices (as OpenAI does); otherwise it rides on the chunk that finishes the last choice. An
    ``ApiError`` from ``steps`` becomes an error event, and the stream still ends with [DONE]."""
    count = params.choices
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
        async for pieces in steps:
            out = []
            for piece in pieces:
                tokens += piece.tokens
                if piece.finish_reason is not None:
                    unfinished.discard(piece.index)
                if piece.text or piece.finish_reason is not None:
                    out.append(choice(piece.index, piece.text or (None if chat else ""), _finish(piece.finish_reason)))
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
