"""The serving engine on its own: a real tiny model, jobs and their events, no web framework."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetlm.config import MAX_AUTO_SLOTS, load_config
from hetlm.planner import load_inventory, make_plan, serving_slots
from hetlm.sampling import Sampler, encode_prompt, make_generator
from hetlm.sampling_settings import SamplingSettings
from hetlm.serve.engine import Engine, EngineStopped, Event, GenerationParams, Job

TIMEOUT = 60


@pytest.fixture(scope="module")
def sampler(loaded, tokenizer):
    return Sampler(loaded.model, tokenizer)


@contextlib.contextmanager
def running(sampler, max_active=4, max_waiting=8, batching=True):
    engine = Engine(sampler, max_active, max_waiting, batching)
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
    """What the job's choices are when the sampler runs each prompt by itself, with a generator seeded by the job's seed."""
    out = []
    for prompt in params.prompts:
        result = sampler.generate(prompt, params.settings, make_generator(params.seed))
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
            # All six are in before any step runs: three slots taken (one job of one sample, one of two), the rest wait.
            submitted = [submit(engine, params) for params in jobs]
            assert engine.in_flight == 6
        results = [listener.until_end() for _, listener in submitted]
        assert engine.slots_in_use == 0 and engine.waiting == 0
    for params, events in zip(jobs, results, strict=True):
        assert events[-1].kind == "done"
        assert choices(params, events) == alone(sampler, params)


def mixed_jobs(sampler, tokenizer, context):
    """Greedy jobs that differ in every way a batch must keep apart: prompt lengths (one filling the context, so its
    window slides at once, and others that slide later), max tokens, stop strings, several prompts, two samples."""
    unstopped = sampler.generate(encode_prompt(tokenizer, "for i in range("), SamplingSettings(max_new_tokens=14, temperature=0),
                                 make_generator(0)).text
    assert len(unstopped) > 8, unstopped
    texts = ["def main(", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self", "x", "for i in range(",
             "中文 😀 ", "return self._" * 6]
    jobs = []
    for i, text in enumerate(texts):
        prompt = encode_prompt(tokenizer, text)
        settings = SamplingSettings(max_new_tokens=[9, 3, context + 20, 14, 1, 2 * context][i], temperature=0,
                                    stop=(unstopped[5:7],) if i == 3 else (), num_samples=2 if i == 1 else 1)
        jobs.append(GenerationParams([prompt], settings, seed=i))
    full = encode_prompt(tokenizer, "import os\n" * context)[:context]
    jobs.append(GenerationParams([full, encode_prompt(tokenizer, "while ")], SamplingSettings(max_new_tokens=12, temperature=0), 9))
    return jobs


@pytest.mark.parametrize("batching", [True, False])
def test_batched_greedy_output_equals_each_request_alone(sampler, tokenizer, batching):
    context = sampler.context_length
    jobs = mixed_jobs(sampler, tokenizer, context)
    forever = GenerationParams([encode_prompt(tokenizer, "y = ")], SamplingSettings(max_new_tokens=5000, ignore_eos=True), 0)
    with running(sampler, max_active=5, max_waiting=16, batching=batching) as engine:
        # Half the jobs, and two that will be cancelled, before the first step; the rest join while those decode.
        with engine.lock:
            first = [submit(engine, params) for params in jobs[:4]]
            doomed = [submit(engine, forever) for _ in range(2)]
        doomed[0][1].events.get(timeout=TIMEOUT)
        later = [submit(engine, params) for params in jobs[4:]]
        doomed[0][0].cancel()
        results = [first[0][1].until_end()]
        doomed[1][0].cancel()
        results += [listener.until_end() for _, listener in first[1:] + later]
        wait_for(lambda: engine.in_flight == 0, "the jobs did not leave the engine")
        assert engine.stats == {"completed": len(jobs), "cancelled": 2, "failed": 0}
        assert engine.slots_in_use == 0 and engine.batch.rows == [] and not engine.batch.prefills
        assert engine.batch.free_slots == engine.slots == 5
        # Batched, a step samples for several sequences; turn by turn, one.
        assert (engine.batch.tokens > 2 * engine.batch.steps) == batching
    for params, events in zip(jobs, results, strict=True):
        assert events[-1].kind == "done"
        assert choices(params, events) == alone(sampler, params), params
    reasons = {reason for params, events in zip(jobs, results, strict=True) for _, _, reason in choices(params, events)}
    assert {"length", "stop"} <= reasons
    # Windows slid: the prompt that fills the context at once, and others along the way.
    slides = [sampler.generate(p, params.settings, make_generator(0)).slides for params in jobs for p in params.prompts]
    assert slides[-2] >= 1 and sum(s > 0 for s in slides) >= 2, slides


def test_a_seeded_job_gives_the_same_text_among_thirty_one_others(sampler, tokenizer):
    def job(i):
        settings = SamplingSettings(max_new_tokens=6 + i % 5, temperature=[0.7, 1.0, 1.3][i % 3], top_k=[0, 20][i % 2],
                                    top_p=[1.0, 0.9, 0.5][i % 3], num_samples=1 + (i % 4 == 0))
        return GenerationParams([encode_prompt(tokenizer, f"value_{i} = ")], settings, seed=1000 + i)

    probe = job(3)
    with running(sampler, max_active=40, max_waiting=0) as engine:
        lone = choices(probe, submit(engine, probe)[1].until_end())
        with engine.lock:
            crowd = [submit(engine, job(i)) for i in range(31)]
            probe_job = submit(engine, probe)
        among = choices(probe, probe_job[1].until_end())
        assert all(listener.until_end()[-1].kind == "done" for _, listener in crowd)
    assert among == lone == alone(sampler, probe)


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


INVENTORIES = Path(__file__).parent / "inventories"


def test_the_planner_sizes_the_slots():
    def slots(inventory, *sets):
        config = load_config(None, list(sets))
        plan = make_plan(load_inventory(INVENTORIES / f"{inventory}.json"), config, workload="serve")
        decision = next(d for d in plan.decisions if d.stage == "serving slots")
        assert (int(decision.choice), decision.reason) == serving_slots(config, plan.inventory, plan.device,
                                                                         plan.decode_weights)
        return int(decision.choice), decision.reason

    count, why = slots("no-gpu")
    assert count == MAX_AUTO_SLOTS and "cap" in why
    assert slots("no-gpu", "serve.max_concurrency=7") == (7, slots("no-gpu", "serve.max_concurrency=7")[1])
    assert "set by serve.max_concurrency" in slots("no-gpu", "serve.max_concurrency=7")[1]
    # A long context on an 8 GB GPU: the KV cache per slot decides, and fewer fit than the cap.
    big = ("model.n_layers=24", "model.d_model=1024", "model.n_heads=16", "model.context_length=4096", "data.vocab_size=32000")
    count, why = slots("one-8gb-gpu", *big)
    assert 1 <= count < MAX_AUTO_SLOTS and "as many as fit" in why
    # bf16 keys and values (the GPU's decode dtype) take half of fp32's room: more fit than at fp32.
    assert slots("one-8gb-gpu", *big, "device.dtype=fp32")[0] < count
    assert slots("one-8gb-gpu", *big, "model.n_layers=200")[0] == 1
