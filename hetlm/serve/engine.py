"""The generation engine: one thread that owns the model and runs queued jobs.

A job is one request's generations. The engine keeps up to ``max_active`` jobs active and advances them
in turn, one step (one sampled token per unfinished choice) each, so model access is serialised, every
job moves at a fair share, and a cancelled job stops at its next step. Jobs beyond the active ones wait
in a bounded queue; past that ``submit`` refuses them, so the caller can answer "busy" instead of piling
up work.

A job's listener, a callable given with the job, hears ``Event``s on the engine thread: one "pieces"
event per step, then "done", or "error". No web framework here: ``hetlm.serve.app`` bridges the events
onto its event loop.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from hetlm.errors import HetlmError
from hetlm.sampling import Sampler, make_generator
from hetlm.sampling_settings import SamplingSettings


@dataclass(frozen=True)
class GenerationParams:
    """What one job generates: ``settings.num_samples`` choices of each prompt, the prompts one after another,
    all drawn from one generator seeded with ``seed``. Choice ``p * num_samples + i`` is sample i of prompt p."""

    prompts: list[list[int]]
    settings: SamplingSettings
    seed: int

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.settings.num_samples


class Piece(NamedTuple):
    """New output of one choice."""

    index: int
    # Text that is final (possibly empty while the detokenizer holds some back).
    text: str
    # Ids sampled for it (0 for the step that ends it at </s>).
    tokens: int
    # The sampler's: None while the choice goes on, then "eos", "stop" or "length".
    finish_reason: str | None


@dataclass(frozen=True)
class Event:
    """What a job's listener hears: "pieces" (what one step produced), then "done"; or "error"."""

    kind: str
    pieces: tuple[Piece, ...] = ()
    error: Exception | None = None


class EngineStopped(HetlmError):
    """The engine stopped before the job finished."""


class Job:
    """One request's generations, handed to the engine thread; ``cancel`` may be called from any thread."""

    def __init__(self, params: GenerationParams, listener: Callable[[Event], None]) -> None:
        self.params = params
        self.listener = listener
        self._cancelled = threading.Event()
        self._steps: Iterator[list[Piece]] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def _emit(self, event: Event) -> None:
        try:
            self.listener(event)
        except Exception:
            # A listener that cannot take events (its event loop has closed) has nobody behind it any more.
            self.cancel()


class Engine:
    """Owns the sampler's model; runs queued jobs on one thread, stepping up to ``max_active`` of them in turn."""

    def __init__(self, sampler: Sampler, max_active: int, max_waiting: int) -> None:
        self.sampler = sampler
        self.max_active, self.capacity = max_active, max_active + max_waiting
        # Held while the model runs a step; anything else in this process that uses the model takes it too.
        self.lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        # Only the engine thread changes it; others read copies.
        self._active: list[Job] = []
        self._stats = {"completed": 0, "cancelled": 0, "failed": 0}
        self._in_flight = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not yet over: active or waiting."""
        return self._in_flight

    @property
    def active(self) -> list[Job]:
        return list(self._active)

    @property
    def stats(self) -> dict[str, int]:
        """Jobs that ended, by how: completed, cancelled or failed."""
        with self._cond:
            return dict(self._stats)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hetlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step; jobs not over hear an ``EngineStopped`` error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the engine is full (``capacity`` jobs in flight) or stopping."""
        with self._cond:
            if self._stopping or self._in_flight >= self.capacity:
                return False
            self._in_flight += 1
            self._waiting.append(job)
            self._cond.notify()
        return True

    def _run(self) -> None:
        active = self._active
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
                        self._stats[outcome] += 1
        for job in leftover:
            job._emit(Event("error", error=EngineStopped("the engine stopped before the job finished")))

    def _step(self, job: Job) -> str | None:
        """Advance ``job`` by one step; once it is over, say how: completed, cancelled or failed."""
        if job.cancelled:
            if job._steps is not None:
                job._steps.close()
            return "cancelled"
        try:
            with self.lock:
                if job._steps is None:
                    job._steps = self._generate(job.params)
                pieces = next(job._steps)
        except StopIteration:
            job._emit(Event("done"))
            return "completed"
        except Exception as exc:  # one failed generation must not take the engine down
            job._emit(Event("error", error=exc))
            return "failed"
        job._emit(Event("pieces", tuple(pieces)))
        return None

    def _generate(self, params: GenerationParams) -> Iterator[list[Piece]]:
        """One list of pieces per step: one sampled token for each unfinished choice of the current prompt."""
        n = params.settings.num_samples
        generator = make_generator(params.seed, self.sampler.device)
        for p, prompt in enumerate(params.prompts):
            generation = self.sampler.stream(prompt, params.settings, generator)
            try:
                unfinished = n
                while unfinished:
                    # The sampler yields one chunk per unfinished sample for each token it samples.
                    step = []
                    for _ in range(unfinished):
                        chunk = next(generation)
                        step.append(Piece(p * n + chunk.index, chunk.text, len(chunk.token_ids), chunk.finish_reason))
                        unfinished -= chunk.finish_reason is not None
                    yield step
            finally:
                generation.close()
