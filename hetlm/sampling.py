"""Sampling text from a model: prefill the prompt, then one token per step with a KV cache.

Shared by ``hetlm generate``, the server and anything else that samples. Everything random draws
from an explicit ``torch.Generator``, so the same seed, prompt and settings give the same text.

Window sliding: a model only sees ``context_length`` tokens. A prompt longer than that is cut from
the left (with a warning). When generation fills the window, the oldest half is dropped and the
newest ``context_length // 2`` tokens are prefilled again into a fresh cache at positions
0..n-1, the way training windows start anywhere in the text. That costs one prefill every
``context_length // 2`` tokens instead of a full forward per token, at the price of the model seeing
between half and all of the window. The no-cache path slides at the same steps, so both paths
condition on exactly the same tokens.

Prefill and the no-cache path run the model itself; single-token steps on the cache run a
``hetlm.decode.Decoder``, which a ``Sampler`` builds once. The tests check that both paths give the
same greedy tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hetlm.decode import Decoder, Decoding
from hetlm.errors import UsageError
from hetlm.model import KVCache, Transformer
from hetlm.reporting import NullReporter, Reporter
from hetlm.sampling_settings import SamplingSettings

if TYPE_CHECKING:
    from hetlm.planner import Plan

# Prompt ids kept before the generated ones when decoding, so text that depends on its left
# neighbour (a byte sequence, a leading-space rule) comes out as in a decode of the whole text.
DETOKENIZER_CONTEXT = 8
REPLACEMENT = "\ufffd"


@dataclass
class Chunk:
    """New output of one sample after a step: text that is final (possibly empty while held back)."""

    index: int
    text: str
    # Ids sampled for this sample in this step (empty for the step that ends it at </s>).
    token_ids: list[int]
    # None while the sample goes on; "eos" (</s>), "stop" (a stop string) or "length" (max new tokens).
    finish_reason: str | None = None


@dataclass
class Completion:
    index: int
    text: str
    # The sampled ids, </s> excluded; with a stop string, up to the token that completed it.
    token_ids: list[int]
    finish_reason: str


@dataclass
class GenerationResult:
    completions: list[Completion]
    # Prompt tokens the model saw, after cutting a too-long prompt from the left.
    prompt_tokens: int
    prompt_truncated: int
    # Tokens sampled over all samples (a final </s> included): the work done.
    new_tokens: int
    # From the call to the first sampled token: the prefill and one sampling step.
    time_to_first_token: float
    seconds: float
    # Times the window slid (the cache was refilled with the newest half of the context).
    slides: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def text(self) -> str:
        """The first sample's text."""
        return self.completions[0].text

    def stats(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_truncated": self.prompt_truncated,
            "new_tokens": self.new_tokens,
            "samples": len(self.completions),
            "time_to_first_token_s": round(self.time_to_first_token, 4),
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "slides": self.slides,
            "finish_reasons": [c.finish_reason for c in self.completions],
        }


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """``<s>`` followed by the text's ids: how every training document starts."""
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` (sampling runs where the logits are) seeded with ``seed``."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed & ((1 << 63) - 1))
    return generator


def sample_next(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): greedy at temperature 0, else top-k / top-p filtered sampling."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / settings.temperature
    if 0 < settings.top_k < logits.size(-1):
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the ones ranked above it already hold top_p of the mass; the top one always stays.
        drop = probs.cumsum(dim=-1) - probs >= settings.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class IncrementalDetokenizer:
    """Turns ids into text as they arrive; what it returns never changes later.

    Each call decodes a short window of recent ids and returns what the newest id added. The text of
    an id can depend on the ids after it: a character split over byte-fallback pieces decodes as
    U+FFFD until its last byte arrives. So a window whose text ends in U+FFFD is held back until
    more ids complete it (or ``flush`` ends the text). The pieces joined equal one decode of all ids.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        # An id with a plain text, after text that is all emitted, adds exactly that text: no decode needed.
        self.plain_texts: Sequence[str | None] = getattr(tokenizer, "plain_texts", ())
        self.ids = [int(i) for i in context_ids][-DETOKENIZER_CONTEXT:] if context_ids else []
        # ids[prefix:read] are decoded and emitted already; they stay in the window as left context.
        self.prefix = 0
        self.read = len(self.ids)
        self.prefix_text = tokenizer.decode(self.ids) if self.ids else ""

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        self.ids.append(token_id)
        plain = self.plain_texts[token_id] if self.read == len(self.ids) - 1 and token_id < len(self.plain_texts) else None
        if plain is not None:
            self.prefix, self.read, self.prefix_text = self.read, len(self.ids), plain
            self._trim()
            return plain
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith(REPLACEMENT) or not text.startswith(self.prefix_text):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """The held-back rest, once no more ids will come."""
        if self.read == len(self.ids):
            return ""
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if not text.startswith(self.prefix_text):
            # Only possible when the context ended inside a character; the prompt part is not ours to emit.
            text = self.prefix_text + text[len(self.prefix_text):]
        return self._emit(text)

    def _emit(self, text: str) -> str:
        new = text[len(self.prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        self._trim()
        return new

    def _trim(self) -> None:
        # Keep the window short: the ids before ``prefix`` are no longer needed.
        if self.prefix > 4 * DETOKENIZER_CONTEXT:
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0


class StopStringFilter:
    """Passes text through until a stop string appears, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, True when a stop string was found: the output ends there)."""
        if not self.stops:
            return text, False
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out = self.pending[: min(found)]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Sampler:
    """Samples from one model; build it once and reuse it (the server does): its decoder copies the weights.

    Prefill's autocast and the steps' weights follow ``plan.decoding`` for the model's device; without a
    plan everything runs in fp32 wherever the model is.
    """

    def __init__(self, model: Transformer, tokenizer: Any, plan: Plan | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # Where the logits come out, and so where sampling and its generator run; a split model's
        # layers keep their caches on their own devices.
        self.device = model.output_device
        self.decoding = plan.decoding(self.device) if plan is not None else Decoding()
        self.decoder = Decoder(model, self.decoding.dtype, self.decoding.int8)

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.decoding.prefill_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.decoding.prefill_autocast)

    def _forward_last(self, window: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        with self._autocast():
            logits, _ = self.model(window, cache=cache, last_only=True)
        return logits[:, -1].float()

    def stream(self, prompt_ids: Sequence[int], settings: SamplingSettings, generator: torch.Generator,
               reporter: Reporter = NullReporter()) -> Generation:
        """Start sampling; iterate the returned Generation for Chunks, then read its ``result``."""
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise UsageError("the prompt is empty: give at least one token (encode_prompt adds <s>)")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise UsageError(f"prompt token ids must be in 0..{vocab - 1}")
        if generator.device.type != self.device.type:
            raise ValueError(f"the generator is on {generator.device}, the model on {self.device}")
        truncated = max(0, len(prompt) - self.context_length)
        if truncated:
            reporter.warning(f"the prompt has {len(prompt)} tokens, more than the context of {self.context_length}: "
                             f"the first {truncated} were cut")
            prompt = prompt[truncated:]
        generation = Generation()
        generation._steps = self._run(generation, prompt, truncated, settings, generator)
        return generation

    def generate(self, prompt_ids: Sequence[int], settings: SamplingSettings, generator: torch.Generator,
                 reporter: Reporter = NullReporter()) -> GenerationResult:
        generation = self.stream(prompt_ids, settings, generator, reporter)
        for _ in generation:
            pass
        assert generation.result is not None
        return generation.result

    def _run(self, generation: Generation, prompt: list[int], truncated: int, settings: SamplingSettings,
             generator: torch.Generator) -> Iterator[Chunk]:
        started = time.perf_counter()
        B, ctx = settings.num_samples, self.context_length
        keep = max(1, ctx // 2)
        eos = None if settings.ignore_eos else self.tokenizer.eos_id
        history = torch.empty((B, len(prompt) + settings.max_new_tokens), dtype=torch.long, device=self.device)
        history[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        n, window_start = len(prompt), 0
        next_ids = history[:, n - 1]  # the newest ids, fed to the next single-token step
        with torch.inference_mode():
            cache = KVCache(self.model.config, B, self.model.layer_devices(), self.decoding.dtype) if settings.use_cache \
                else None
            flat = self.decoder.flat_cache(cache) if cache is not None else []

        samples = [_SampleState(self.tokenizer, prompt, settings.stop) for _ in range(B)]
        active = B
        new_tokens = slides = 0
        first_token_at = None
        for step in range(settings.max_new_tokens):
            with torch.inference_mode():
                if step == 0:
                    logits = self._forward_last(history[:, :n], cache)  # prefill
                elif n - window_start > ctx:
                    # The window is full: keep its newest half, prefilled again from position 0.
                    window_start = n - keep
                    slides += 1
                    if cache is not None:
                        cache.length = 0
                    logits = self._forward_last(history[:, window_start:n], cache)
                elif cache is not None:
                    logits = self.decoder.step(next_ids, cache, flat)
                else:
                    logits = self._forward_last(history[:, window_start:n], None)
                next_ids = sample_next(logits, settings, generator)
                history[:, n] = next_ids
            n += 1
            ids = next_ids.tolist()
            if first_token_at is None:
                first_token_at = time.perf_counter()
            last_step = step == settings.max_new_tokens - 1
            chunks = []
            for index, (state, token) in enumerate(zip(samples, ids, strict=True)):
                if state.finish_reason is not None:
                    continue
                new_tokens += 1
                chunk = state.add(index, token, eos, last_step)
                if chunk.finish_reason is not None:
                    active -= 1
                chunks.append(chunk)
            yield from chunks
            if not active:
                break

        ended = time.perf_counter()
        generation.result = GenerationResult(
            completions=[s.completion(i) for i, s in enumerate(samples)],
            prompt_tokens=len(prompt),
            prompt_truncated=truncated,
            new_tokens=new_tokens,
            time_to_first_token=(first_token_at or ended) - started,
            seconds=ended - started,
            slides=slides,
        )


class _SampleState:
    """Detokenizer, stop strings and output of one sample in a batch."""

    def __init__(self, tokenizer: Any, prompt: list[int], stops: Sequence[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        self.stops = StopStringFilter(stops)
        self.token_ids: list[int] = []
        self.parts: list[str] = []
        self.finish_reason: str | None = None

    def add(self, index: int, token: int, eos: int | None, last: bool) -> Chunk:
        if token == eos:
            return self._finish(Chunk(index, "", [], "eos"), self.detokenizer.flush())
        self.token_ids.append(token)
        text, stopped = self.stops.feed(self.detokenizer.add(token))
        if stopped:
            self.parts.append(text)
            self.finish_reason = "stop"
            return Chunk(index, text, [token], "stop")
        chunk = Chunk(index, text, [token])
        self.parts.append(text)
        if last:
            return self._finish(chunk, self.detokenizer.flush(), reason="length")
        return chunk

    def _finish(self, chunk: Chunk, rest: str, reason: str | None = None) -> Chunk:
        text, stopped = self.stops.feed(rest)
        if not stopped:
            text += self.stops.flush()
        self.parts.append(text)
        self.finish_reason = "stop" if stopped else (reason or chunk.finish_reason)
        return dataclasses.replace(chunk, text=chunk.text + text, finish_reason=self.finish_reason)

    def completion(self, index: int) -> Completion:
        return Completion(index, "".join(self.parts), self.token_ids, self.finish_reason or "length")


class Generation:
    """An iterator of Chunks; ``result`` is set once it is exhausted. ``close()`` stops it early."""

    def __init__(self) -> None:
        self.result: GenerationResult | None = None
        self._steps: Iterator[Chunk] = iter(())

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Chunk:
        return next(self._steps)

    def close(self) -> None:
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()
