"""The serving engine on its own: a real tiny model, jobs and their events, no web framework."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetlm.sampling import Sampler, encode_prompt, make_generator
from hetlm.sampling_settings import SamplingSettings
from hetlm.serve.engine import Engine, EngineStopped, Event, GenerationParams, Job

TIMEOUT = 60


@pytest.fixture(scope="module")
def sampler(loaded, tokenizer):
    return Sampler(loaded.model, tokenizer)


@contextlib.contextmanager
def running(sampler, max_active=4, max_waiting=8):
    engine = Engine(sampler, max_active, max_waiting)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


class Listener:
    """Collects a job's events from the engine thread."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def until_end(self) -> list[Event]:
        """Every event up to and including "done" or "error"."""
        seen = []
        while not seen or seen[-1].kind == "pieces":
            seen.append(self.events.get(timeout=TIMEOUT))
        return seen


def submit(engine, params):
    listener = Listener()
    job = Job(params, listener)
    assert engine.submit(job)
    return job, listener


def choices(params, events):
    """(text, sampled ids, finish reason) of each choice, put together from the job's pieces."""
    out = [["", 0, None] for _ in range(params.choices)]
    for event in events:
        for piece in event.pieces:
            assert out[piece.index][2] is None, "a choice went on after it finished"
            out[piece.index][0] += piece.text
            out[piece.index][1] += piece.tokens
            out[piece.index][2] = piece.finish_reason
    return [tuple(c) for c in out]


def alone(sampler, params):
    """What the job's choices are when the sampler runs its prompts itself, one after another on one generator."""
    generator = make_generator(params.seed)
    out = []
    for prompt in params.prompts:
        result = sampler.generate(prompt, params.settings, generator)
        out += [(c.text, len(c.token_ids), c.finish_reason) for c in result.completions]
    return out


def wait_for(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_seeded_job_gives_the_samplers_text(sampler, tokenizer):
    settings = SamplingSettings(max_new_tokens=24, temperature=1.0, top_k=40, stop=("\n\n",), num_samples=2)
    params = GenerationParams([encode_prompt(tokenizer, "import "), encode_prompt(tokenizer, "def 中文(")], settings, 7)
    with running(sampler) as engine:
        job, listener = submit(engine, params)
        events = listener.until_end()
        assert events[-1].kind == "done"
        wait_for(lambda: engine.in_flight == 0, "the job did not leave the engine")
        assert engine.stats == {"completed": 1, "cancelled": 0, "failed": 0}
    got = choices(params, events)
    assert got == alone(sampler, params)
    assert all(reason in ("eos", "stop", "length") for _, _, reason in got)
    assert len({text for text, _, _ in got}) > 1


def test_jobs_stepped_together_each_give_their_text_alone(sampler, tokenizer):
    jobs = [GenerationParams([encode_prompt(tokenizer, f"value_{i} = ")],
                             SamplingSettings(max_new_tokens=12 + i, temperature=0.9, num_samples=1 + i % 2), seed=i)
            for i in range(6)]
    with running(sampler, max_active=3, max_waiting=3) as engine:
        with engine.lock:
            # All six are in before any step runs: three active, three waiting, stepped in turn.
            submitted = [submit(engine, params) for params in jobs]
            assert engine.in_flight == 6
        results = [listener.until_end() for _, listener in submitted]
    for params, events in zip(jobs, results, strict=True):
        assert events[-1].kind == "done"
        assert choices(params, events) == alone(sampler, params)


def test_a_full_engine_refuses_jobs_until_there_is_room(sampler, tokenizer):
    params = GenerationParams([encode_prompt(tokenizer, "a")], SamplingSettings(max_new_tokens=2), seed=0)
    with running(sampler, max_active=1, max_waiting=1) as engine:
        assert engine.capacity == 2
        with engine.lock:
            # The model is held: one job is taken and waits for it, one waits in the queue, the third is refused.
            first, second = submit(engine, params), submit(engine, params)
            assert engine.in_flight == 2
            assert not engine.submit(Job(params, Listener()))
        for _, listener in (first, second):
            assert listener.until_end()[-1].kind == "done"
        wait_for(lambda: engine.in_flight == 0, "the jobs did not leave the engine")
        assert submit(engine, params)[1].until_end()[-1].kind == "done"
        assert engine.stats["completed"] == 3


def test_a_cancelled_job_stops_at_its_next_step(sampler, tokenizer):
    params = GenerationParams([encode_prompt(tokenizer, "for ")],
                              SamplingSettings(max_new_tokens=5000, temperature=1.0, ignore_eos=True), seed=1)
    with running(sampler) as engine:
        job, listener = submit(engine, params)
        assert listener.events.get(timeout=TIMEOUT).kind == "pieces"
        with engine.lock:
            job.cancel()
            heard = listener.events.qsize()
        wait_for(lambda: engine.in_flight == 0, "the cancelled job did not leave the engine")
        assert engine.stats == {"completed": 0, "cancelled": 1, "failed": 0}
        assert engine.active == []
        # At most the step that was waiting for the model when the job was cancelled ran after it, and nothing ends
        # the job's events: its listener has gone.
        assert listener.events.qsize() - heard <= 1
        assert all(listener.events.get_nowait().kind == "pieces" for _ in range(listener.events.qsize()))
        # Cancelled before its first step: no step runs at all.
        with engine.lock:
            waiting, untouched = submit(engine, params)
            waiting.cancel()
        wait_for(lambda: engine.in_flight == 0, "the job cancelled while waiting did not leave the engine")
        assert untouched.events.empty() and engine.stats["cancelled"] == 2


def test_a_failed_job_reports_its_error_and_the_engine_goes_on(sampler, tokenizer):
    broken = GenerationParams([[1, tokenizer.vocab_size]], SamplingSettings(max_new_tokens=2), seed=0)
    fine = GenerationParams([encode_prompt(tokenizer, "x")], SamplingSettings(max_new_tokens=2, temperature=0), seed=0)
    with running(sampler) as engine:
        events = submit(engine, broken)[1].until_end()
        assert events[-1].kind == "error" and "token ids must be in" in str(events[-1].error)
        assert submit(engine, fine)[1].until_end()[-1].kind == "done"
        wait_for(lambda: engine.in_flight == 0, "the jobs did not leave the engine")
        assert engine.stats == {"completed": 1, "cancelled": 0, "failed": 1}


def test_a_listener_that_is_gone_cancels_its_job(sampler, tokenizer):
    def gone(event):
        raise RuntimeError("Event loop is closed")

    params = GenerationParams([encode_prompt(tokenizer, "x")], SamplingSettings(max_new_tokens=200, ignore_eos=True), 0)
    with running(sampler) as engine:
        job = Job(params, gone)
        assert engine.submit(job)
        wait_for(lambda: engine.in_flight == 0, "the job of a gone listener did not leave the engine")
        assert job.cancelled and engine.stats["cancelled"] == 1


def test_stopping_ends_the_jobs_left_and_refuses_new_ones(sampler, tokenizer):
    long = GenerationParams([encode_prompt(tokenizer, "x")], SamplingSettings(max_new_tokens=5000, ignore_eos=True), 0)
    engine = Engine(sampler, 1, 4)
    engine.start()
    (_, active), *waiting = [submit(engine, long) for _ in range(3)]
    assert active.events.get(timeout=TIMEOUT).kind == "pieces"
    engine.stop()
    end = active.until_end()[-1]
    assert end.kind == "error" and isinstance(end.error, EngineStopped)
    for _, listener in waiting:
        # Never started: the error is all they hear.
        (end,) = listener.until_end()
        assert end.kind == "error" and isinstance(end.error, EngineStopped)
    assert not engine.submit(Job(long, Listener()))


def test_the_engine_needs_no_web_framework():
    blocked = "import sys\nfor name in ('fastapi', 'starlette', 'pydantic', 'uvicorn'):\n    sys.modules[name] = None\n"
    code = blocked + "import hetlm.serve, hetlm.serve.engine\nprint('ok')\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
