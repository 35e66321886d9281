"""The generation engine: one thread that owns the model and runs queued jobs in one continuous batch.

A job is one request's generations: for each of its prompts, ``num_samples`` samples. The engine keeps a
``hetlm.sampling.Batch`` of ``slots`` sequences; each prompt joins it as soon as enough slots are free (its
samples share one prefill), and every step advances every sequence in the batch by one token in one decoder
step. A sequence that finishes, and every sequence of a cancelled job, leaves its slot at the next step. With
``batching=False`` the same batch steps its sequences one at a time instead (the turn-by-turn engine, kept so
the comparison can be rerun). Jobs beyond the slots wait, first come first served; past ``capacity`` jobs in
flight ``submit`` refuses them, so the caller can answer "busy" instead of piling up work.

Sampling is per sample: prompt p of a job draws from ``make_generator(seed)`` split into one generator per
sample, as ``Sampler.stream`` does, so a seeded request gives the same text alone, in a list of prompts, or
beside any other requests.

A job's listener, a callable given with the job, hears ``Event``s on the engine thread: one "pieces" event
per step in which the job produced something, then "done", or "error". No web framework here:
``hetlm.serve.app`` bridges the events onto its event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from hetlm.errors import HetlmError
from hetlm.sampling import Batch, Group, Sampler, make_generator, split_generator
from hetlm.sampling_settings import SamplingSettings


@dataclass(frozen=True)
class GenerationParams:
    """What one job generates: ``settings.num_samples`` choices of each prompt, each prompt sampled from a generator
    seeded with ``seed``. Choice ``p * num_samples + i`` is sample i of prompt p."""

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
        # Engine-thread state: the next prompt to start, and the groups of the prompts started and not finished.
        self._next = 0
        self._groups: list[Group] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def started(self) -> bool:
        return self._next > 0

    def cancel(self) -> None:
        self._cancelled.set()

    def _emit(self, event: Event) -> None:
        try:
            self.listener(event)
        except Exception:
            # A listener that cannot take events (its event loop has closed) has nobody behind it any more.
            self.cancel()


class Engine:
    """Owns the sampler's model; runs queued jobs on one thread, up to ``slots`` sequences in one batch."""

    def __init__(self, sampler: Sampler, slots: int, max_waiting: int, batching: bool = True) -> None:
        self.sampler = sampler
        self.batch = Batch(sampler, slots, batched=batching)
        self.capacity = slots + max_waiting
        # Held while the model runs a step; anything else in this process that uses the model takes it too.
        self.lock = threading.Lock()
        self._cond = threading.Condition()
        # Jobs in flight, oldest first; the engine thread starts their prompts in this order.
        self._jobs: list[Job] = []
        self._stats = {"completed": 0, "cancelled": 0, "failed": 0}
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def slots(self) -> int:
        return self.batch.slots

    @property
    def slots_in_use(self) -> int:
        return self.batch.in_use

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not yet over: active or waiting."""
        return len(self._jobs)

    @property
    def jobs(self) -> list[Job]:
        """Jobs in flight, oldest first."""
        return list(self._jobs)

    @property
    def active(self) -> list[Job]:
        """Jobs with a prompt in the batch."""
        return [job for job in list(self._jobs) if job.started]

    @property
    def waiting(self) -> int:
        """Jobs waiting for their first slots."""
        return sum(not job.started for job in list(self._jobs))

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
        if job.params.settings.num_samples > self.slots:
            raise ValueError(f"{job.params.settings.num_samples} samples of a prompt need as many slots, "
                             f"the engine has {self.slots}")
        with self._cond:
            if self._stopping or len(self._jobs) >= self.capacity:
                return False
            self._jobs.append(job)
            self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._jobs:
                    self._cond.wait()
                if self._stopping:
                    leftover, self._jobs = self._jobs, []
                    break
            self._step()
        for job in leftover:
            job._emit(Event("error", error=EngineStopped("the engine stopped before the job finished")))

    def _step(self) -> None:
        # A method of its own, so nothing of a step outlives it (the jobs it touched included).
        with self.lock:
            # Under the lock, so a job cancelled while a step waited for the model gets no step after it.
            for cancelled in [job for job in self._jobs if job.cancelled]:
                self._end(cancelled, "cancelled")
            self._start_prompts()
            try:
                output = self.batch.step() if self.batch.in_use else []
            except Exception as exc:  # one failed step must not take the engine down
                for job in self.active:
                    self._end(job, "failed", Event("error", error=exc))
                return
        self._deliver(output)

    def _start_prompts(self) -> None:
        """Prompts join the batch in the order their jobs came, each once its samples have a slot each."""
        for job in list(self._jobs):
            params = job.params
            n = params.settings.num_samples
            while job._next < len(params.prompts):
                if self.batch.free_slots < n:
                    return
                group = Group(params.prompts[job._next], params.settings,
                              split_generator(make_generator(params.seed, self.sampler.device), n),
                              owner=(job, job._next * n))
                job._next += 1
                try:
                    self.batch.add(group)
                except Exception as exc:
                    self._end(job, "failed", Event("error", error=exc))
                    break
                job._groups.append(group)

    def _deliver(self, output: list) -> None:
        pieces: dict[Job, list[Piece]] = {}
        for group, chunks in output:
            job, base = group.owner
            pieces.setdefault(job, []).extend(
                Piece(base + c.index, c.text, len(c.token_ids), c.finish_reason) for c in chunks)
        for job, produced in pieces.items():
            job._emit(Event("pieces", tuple(produced)))
            job._groups = [g for g in job._groups if not g.done]
            if not job._groups and job._next == len(job.params.prompts) and job in self._jobs:
                self._end(job, "completed", Event("done"))

    def _end(self, job: Job, outcome: str, event: Event | None = None) -> None:
        for group in job._groups:
            self.batch.remove(group)
        job._groups = []
        with self._cond:
            self._jobs.remove(job)
            self._stats[outcome] += 1
        if event is not None:
            job._emit(event)
