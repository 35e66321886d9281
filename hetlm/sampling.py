"""Sampling text from a model: prefill the prompt, then one token per step with a KV cache.

Shared by ``hetlm generate``, the server and anything else that samples. Everything random draws
from an explicit ``torch.Generator``: each sample has its own, so the same seed, prompt and settings give
the same text, alone or beside any other generations.

A ``Batch`` generates many sequences at once, a slot of a ``hetlm.decode.SlotCache`` each: a prompt that
joins is prefilled (in chunks, so a long one does not stall the others), then every sequence advances by
one token in one decoder step, each with its own sampling settings. ``hetlm generate`` runs a batch of its
samples; the server's engine keeps one batch for all its requests (continuous batching). The samples of one
prompt share its prefill.

Window sliding: a model only sees ``context_length`` tokens. A prompt longer than that is cut from
the left (with a warning). When generation fills the window, the oldest half is dropped and the
newest ``context_length // 2`` tokens are prefilled again into a fresh cache at positions
0..n-1, the way training windows start anywhere in the text. That costs one prefill every
``context_length // 2`` tokens instead of a full forward per token, at the price of the model seeing
between half and all of the window. Each sequence slides on its own; the no-cache path slides at the
same steps, so both paths condition on exactly the same tokens.

Prefill and the no-cache path run the model itself; single-token steps on the cache run a
``hetlm.decode.Decoder``, which a ``Sampler`` builds once. The tests check that both paths give the
same greedy tokens, and that a sequence's tokens do not depend on what it is batched with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hetlm.decode import Decoder, Decoding, SlotCache
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
# Below this temperature sampling is greedy: dividing by a smaller one would leave nothing but the argmax
# anyway, and by a subnormal one (1e-300 is 0 in fp32) would give 0/0.
MIN_TEMPERATURE = 1e-4
# Prompt tokens a batch prefills per step at most, so a long prompt joins over several steps while the
# sequences already decoding keep getting their tokens.
PREFILL_CHUNK = 256


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
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate ("\ud800" in JSON, or undecodable bytes in argv) is no character and has no UTF-8.
        raise UsageError(f"the prompt is not valid Unicode text: {exc.reason} at character {exc.start} "
                         f"({text[exc.start]!r})") from None
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` (sampling runs where the logits are), its stream chosen by ``seed``.

    Any integer is hashed first: ``manual_seed`` alone aliases seeds (torch's CPU generator keeps only a seed's
    low 32 bits, and -1 is 2**64 - 1), so 1 and 1 + 2**32 would give the same text. On the CPU two seeds still
    share a stream with probability 2**-32, as any 32-bit seeding must; CUDA's generator takes all 64 bits.
    """
    digest = hashlib.blake2b(str(int(seed)).encode("ascii"), digest_size=8).digest()
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int.from_bytes(digest, "little"))
    return generator


def split_generator(generator: torch.Generator, count: int) -> list[torch.Generator]:
    """One generator per sample, seeded by successive draws from ``generator``: sample i's text depends on the
    generator and i alone (not on how many samples there are, nor on what the others draw)."""
    seeds = [int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)) for _ in range(count)]
    return [make_generator(seed, generator.device) for seed in seeds]


class Uniforms:
    """Uniform numbers in [0, 1) from one generator, drawn ``BLOCK`` at a time: sampling takes one per token, and a
    tensor op per block costs far less than one per token. What a sequence draws depends on its generator alone."""

    BLOCK = 64

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.ready: list[float] = []

    def next(self) -> float:
        if not self.ready:
            block = torch.rand(self.BLOCK, generator=self.generator, dtype=torch.float64, device=self.generator.device)
            self.ready = block.tolist()[::-1]
        return self.ready.pop()


def sample_next(logits: torch.Tensor, settings: Sequence[SamplingSettings], uniforms: Sequence[Uniforms]) -> torch.Tensor:
    """Next ids (B,) from logits (B, V), row b by ``settings[b]`` and drawing from ``uniforms[b]`` alone.

    Greedy below ``MIN_TEMPERATURE``; otherwise top-k and top-p filtered sampling by inverting the CDF at one
    uniform number per row. The logits' maximum is subtracted before dividing by the temperature, so no
    temperature can overflow, and top-p keeps the likeliest token however small p is.
    """
    sampled = [b for b, s in enumerate(settings) if s.temperature >= MIN_TEMPERATURE]
    if not sampled:
        return logits.argmax(dim=-1)
    every = len(sampled) == len(settings)
    rules = settings if every else [settings[b] for b in sampled]
    x = (logits if every else logits[sampled]).float()
    device, V = x.device, x.size(-1)
    temperature = torch.tensor([s.temperature for s in rules], device=device)[:, None]
    x = (x - x.amax(dim=-1, keepdim=True)) / temperature  # every exponent <= 0, the top one exactly 0
    order = None
    if any(0 < s.top_k < V or s.top_p < 1 for s in rules):
        x, order = torch.sort(x, dim=-1, descending=True)
        ranks = torch.arange(V, device=device)
        top_k = torch.tensor([s.top_k if 0 < s.top_k < V else V for s in rules], device=device)[:, None]
        x = x.masked_fill(ranks >= top_k, float("-inf"))
        probs = x.softmax(dim=-1)
        # Drop a token when the ones ranked above it already hold top_p of the mass; the top one always stays.
        top_p = torch.tensor([s.top_p for s in rules], device=device)[:, None]
        drop = (probs.cumsum(dim=-1) - probs >= top_p) & (ranks > 0)
        x = x.masked_fill(drop, float("-inf"))
    # Unnormalised (the total is at least 1); summed in float64 so the smallest weights still count.
    cdf = x.exp().double().cumsum(dim=-1)
    uniform = torch.tensor([uniforms[b].next() for b in sampled], dtype=torch.float64, device=device)
    total = cdf[:, -1]
    # Strictly below the total, so the first entry above it is a token with weight > 0.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    if order is not None:
        ids = order.gather(1, ids[:, None]).squeeze(1)
    if every:
        return ids
    out = logits.argmax(dim=-1)
    out[sampled] = ids
    return out


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


def check_prompt(prompt: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt as a list of ints; UsageError when it is empty or has an id outside the vocabulary."""
    ids = [int(i) for i in prompt]
    if not ids:
        raise UsageError("the prompt is empty: give at least one token (encode_prompt adds <s>)")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise UsageError(f"prompt token ids must be in 0..{vocab_size - 1}")
    return ids


class Group:
    """One prompt's samples, generated together in a ``Batch``: the prompt is prefilled once and shared.

    ``generators`` holds one generator per sample (``split_generator``); ``owner`` is the caller's, untouched.
    """

    def __init__(self, prompt: Sequence[int], settings: SamplingSettings, generators: Sequence[torch.Generator],
                 owner: Any = None) -> None:
        if len(generators) != settings.num_samples:
            raise ValueError(f"{settings.num_samples} samples need as many generators, got {len(generators)}")
        self.prompt = [int(i) for i in prompt]
        self.settings = settings
        self.uniforms = [Uniforms(g) for g in generators]
        self.owner = owner
        self.samples: list[_Sequence] = []
        self.unfinished = settings.num_samples
        # Tokens sampled over all samples (a final </s> included).
        self.new_tokens = 0
        self.first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.unfinished == 0


class _Sequence:
    """One sample of a group: its ids so far, its window, its output, and its row in the batch's cache."""

    def __init__(self, group: Group, index: int, state: _SampleState) -> None:
        self.group, self.index, self.state = group, index, state
        self.uniforms = group.uniforms[index]
        self.ids = list(group.prompt)
        # The window: the cache holds ids[start:] but the newest, which the next step feeds.
        self.start = 0
        self.row: int | None = None
        self.sampled = 0
        self.slides = 0


@dataclass
class _Prefill:
    """Ids to prefill into the batch's scratch cache, then hand to ``sequences`` (one prompt's samples, or one
    sequence whose window slid)."""

    sequences: list[_Sequence]
    ids: list[int]
    done: int = 0


class Batch:
    """Sequences generating together, one slot each, at most ``slots`` at a time.

    ``add`` a ``Group`` when ``free_slots`` allow; each ``step`` prefills what joined (``PREFILL_CHUNK`` tokens at
    most, so a long prompt joins over several steps while the others keep going), then advances every sequence
    that has its prompt by one token, all in one decoder step (``batched``) or one step per sequence in turn
    (``batched=False``: the turn-by-turn engine, kept for comparison). A sequence that finishes leaves its slot
    at once; one whose window fills slides, alone. Sampling is per sequence, each with its settings and its own
    generator, so what a sequence generates does not depend on what it shares the batch with.
    """

    def __init__(self, sampler: Sampler, slots: int, batched: bool = True) -> None:
        if slots < 1:
            raise ValueError(f"a batch needs at least one slot, got {slots}")
        config = sampler.model.config
        self.sampler = sampler
        self.batched = batched
        self.context = config.context_length
        self.cache = SlotCache(config, slots, sampler.model.layer_devices(), sampler.decoding.dtype)
        # Where prompts are prefilled, one at a time, before their keys and values go to their rows.
        self.scratch = KVCache(config, 1, sampler.model.layer_devices(), sampler.decoding.dtype)
        # Row i of the cache holds rows[i]; rows stay packed, so a step reads a prefix of the cache.
        self.rows: list[_Sequence] = []
        self.prefills: deque[_Prefill] = deque()
        # Decoder steps run, and the tokens they and the prefills sampled: tokens / steps is the mean batch.
        self.steps = 0
        self.tokens = 0
        # Slots held by unfinished sequences (decoding, or waiting for or in a prefill); a plain int, so other
        # threads may read it while this one changes the rows and the prefills.
        self.held = 0

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def in_use(self) -> int:
        """Slots held: sequences decoding, and those waiting for (or in) their prefill."""
        return self.held

    @property
    def free_slots(self) -> int:
        return self.slots - self.in_use

    def add(self, group: Group) -> None:
        """Start ``group``: its samples take a slot each (``free_slots`` must allow), its prompt joins the prefills."""
        n = group.settings.num_samples
        if n > self.free_slots:
            raise ValueError(f"{n} samples need {n} slots, {self.free_slots} are free")
        prompt = check_prompt(group.prompt, self.sampler.model.config.vocab_size)
        if len(prompt) > self.context:
            raise UsageError(f"the prompt has {len(prompt)} tokens, more than the context of {self.context}: cut it first")
        tokenizer = self.sampler.tokenizer
        group.samples = [_Sequence(group, i, _SampleState(tokenizer, prompt, group.settings.stop)) for i in range(n)]
        self.prefills.append(_Prefill(list(group.samples), prompt))
        self.held += n

    def remove(self, group: Group) -> None:
        """Drop ``group`` whatever it is doing (a cancelled request): its slots are free for the next step."""
        self.prefills = deque(p for p in self.prefills if p.sequences[0].group is not group)
        self._leave([s for s in group.samples if s.row is not None])
        self.held -= sum(s.state.finish_reason is None for s in group.samples)

    @torch.inference_mode()
    def step(self) -> list[tuple[Group, list[Chunk]]]:
        """Prefill, then one token for every sequence past its prefill; the groups that produced output, each with
        its chunks (one per sample that sampled, in the order they did)."""
        out: dict[int, tuple[Group, list[Chunk]]] = {}
        self._prefill(out)
        if self.rows:
            sequences = list(self.rows)
            tokens = torch.tensor([s.ids[-1] for s in sequences], device=self.sampler.device)
            decoder = self.sampler.decoder
            if self.batched:
                logits = decoder.step(tokens, self.cache)
                self.steps += 1
            else:
                logits = torch.cat([decoder.step(tokens[i : i + 1], self.cache, i) for i in range(len(sequences))])
                self.steps += len(sequences)
            self._sample(sequences, logits, out)
        return list(out.values())

    def _prefill(self, out: dict[int, tuple[Group, list[Chunk]]]) -> None:
        budget = PREFILL_CHUNK
        while self.prefills and budget > 0:
            item = self.prefills[0]
            if item.done == 0:
                self.scratch.length = 0
            chunk = item.ids[item.done : item.done + budget]
            window = torch.tensor([chunk], device=self.sampler.device)
            logits = self.sampler._forward_last(window, self.scratch)  # (1, V)
            item.done += len(chunk)
            budget -= len(chunk)
            if item.done < len(item.ids):
                return
            self.prefills.popleft()
            for sequence in item.sequences:
                sequence.row = len(self.rows)
                self.rows.append(sequence)
                self.cache.load(sequence.row, self.scratch)
            self._sample(item.sequences, logits.expand(len(item.sequences), -1), out)

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor, out: dict[int, tuple[Group, list[Chunk]]]) -> None:
        ids = sample_next(logits, [s.group.settings for s in sequences], [s.uniforms for s in sequences]).tolist()
        now = time.perf_counter()
        self.tokens += len(ids)
        leaving, sliding = [], []
        for sequence, token in zip(sequences, ids, strict=True):
            group, settings = sequence.group, sequence.group.settings
            eos = None if settings.ignore_eos else self.sampler.tokenizer.eos_id
            sequence.sampled += 1
            group.new_tokens += 1
            if group.first_token_at is None:
                group.first_token_at = now
            chunk = sequence.state.add(sequence.index, token, eos, sequence.sampled == settings.max_new_tokens)
            out.setdefault(id(group), (group, []))[1].append(chunk)
            sequence.ids.append(token)
            if chunk.finish_reason is not None:
                group.unfinished -= 1
                leaving.append(sequence)
            elif len(sequence.ids) - sequence.start > self.context:
                sliding.append(sequence)
        self._leave(leaving + sliding)
        self.held -= len(leaving)
        for sequence in sliding:
            # The window is full: keep its newest half, prefilled again from position 0, ahead of prompts that wait
            # (behind the one whose prefill has begun: the scratch cache holds it).
            sequence.start = len(sequence.ids) - max(1, self.context // 2)
            sequence.slides += 1
            at = 1 if self.prefills and self.prefills[0].done else 0
            self.prefills.insert(at, _Prefill([sequence], sequence.ids[sequence.start :]))

    def _leave(self, sequences: list[_Sequence]) -> None:
        # From the highest row down, each freed row takes the last row's sequence: the rows stay packed.
        for sequence in sorted((s for s in sequences if s.row is not None), key=lambda s: s.row, reverse=True):
            last = len(self.rows) - 1
            if sequence.row != last:
                moved = self.rows[last]
                self.cache.move(last, sequence.row)
                self.rows[sequence.row] = moved
                moved.row = sequence.row
            else:
                self.cache.lengths[last] = 0
            self.rows.pop()
            sequence.row = None


class Sampler:
    """Samples from one model; build it once and reuse it (the server does): its decoder copies the weights.

    Prefill's autocast and the steps' weights follow ``plan.decoding`` for the model's device; without a
    plan everything runs in fp32 wherever the model is.
    """

    def __init__(self, model: Transformer, tokenizer: Any, plan: Plan | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # Where the logits come out, and so where sampling and its generators run; a split model's layers keep
        # their caches on their own devices.
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
        """Start sampling; iterate the returned Generation for Chunks, then read its ``result``.

        Sample i draws from the i-th of ``split_generator(generator, settings.num_samples)``."""
        prompt = check_prompt(prompt_ids, self.model.config.vocab_size)
        if generator.device.type != self.device.type:
            raise ValueError(f"the generator is on {generator.device}, the model on {self.device}")
        truncated = max(0, len(prompt) - self.context_length)
        if truncated:
            reporter.warning(f"the prompt has {len(prompt)} tokens, more than the context of {self.context_length}: "
                             f"the first {truncated} were cut")
            prompt = prompt[truncated:]
        generators = split_generator(generator, settings.num_samples)
        generation = Generation()
        run = self._run if settings.use_cache else self._run_uncached
        generation._steps = run(generation, prompt, truncated, settings, generators)
        return generation

    def generate(self, prompt_ids: Sequence[int], settings: SamplingSettings, generator: torch.Generator,
                 reporter: Reporter = NullReporter()) -> GenerationResult:
        generation = self.stream(prompt_ids, settings, generator, reporter)
        for _ in generation:
            pass
        assert generation.result is not None
        return generation.result

    def _run(self, generation: Generation, prompt: list[int], truncated: int, settings: SamplingSettings,
             generators: list[torch.Generator]) -> Iterator[Chunk]:
        started = time.perf_counter()
        batch = Batch(self, settings.num_samples)
        group = Group(prompt, settings, generators)
        batch.add(group)
        while not group.done:
            for _, chunks in batch.step():
                yield from chunks
        generation.result = self._result(group, [s.state for s in group.samples], truncated, started,
                                         max(s.slides for s in group.samples))

    def _run_uncached(self, generation: Generation, prompt: list[int], truncated: int, settings: SamplingSettings,
                      generators: list[torch.Generator]) -> Iterator[Chunk]:
        """The reference path: every step runs the model on the whole window, all samples in lockstep."""
        started = time.perf_counter()
        B, ctx = settings.num_samples, self.context_length
        eos = None if settings.ignore_eos else self.tokenizer.eos_id
        history = torch.empty((B, len(prompt) + settings.max_new_tokens), dtype=torch.long, device=self.device)
        history[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        n, window_start, slides = len(prompt), 0, 0
        group = Group(prompt, settings, generators)
        samples = [_SampleState(self.tokenizer, prompt, settings.stop) for _ in range(B)]
        for step in range(settings.max_new_tokens):
            if n - window_start > ctx:
                window_start = n - max(1, ctx // 2)
                slides += 1
            with torch.inference_mode():
                logits = self._forward_last(history[:, window_start:n], None)
                next_ids = sample_next(logits, [settings] * B, group.uniforms)
                history[:, n] = next_ids
            n += 1
            if group.first_token_at is None:
                group.first_token_at = time.perf_counter()
            chunks = []
            for index, (state, token) in enumerate(zip(samples, next_ids.tolist(), strict=True)):
                if state.finish_reason is not None:
                    continue
                group.new_tokens += 1
                chunks.append(state.add(index, token, eos, step == settings.max_new_tokens - 1))
                group.unfinished -= chunks[-1].finish_reason is not None
            yield from chunks
            if group.done:
                break
        generation.result = self._result(group, samples, truncated, started, slides)

    @staticmethod
    def _result(group: Group, samples: list[_SampleState], truncated: int, started: float, slides: int) -> GenerationResult:
        ended = time.perf_counter()
        return GenerationResult(
            completions=[s.completion(i) for i, s in enumerate(samples)],
            prompt_tokens=len(group.prompt),
            prompt_truncated=truncated,
            new_tokens=group.new_tokens,
            time_to_first_token=(group.first_token_at or ended) - started,
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
