"""``hetlm serve`` against a real uvicorn on a free localhost port, spoken to by the official openai client."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from hetlm.cli.serve import resolve_api_key
from hetlm.decode import Int8Weight
from hetlm.deploy import deploy
from hetlm.planner import detect_inventory, make_plan
from hetlm.sampling_settings import SamplingError, SamplingSettings
from hetlm.serve.app import bind_warning, create_app, server_config
from hetlm.serve.engine import Job
from hetlm.serve.protocol import MAX_CHOICES, MAX_STOP

NAME = "tiny"
KEY = "sk-test-key"


@contextlib.contextmanager
def running(loaded, **options):
    """A real uvicorn serving ``loaded`` on a free 127.0.0.1 port in a background thread; yields (url, app)."""
    plan = make_plan(detect_inventory(), loaded.config, workload="infer")
    loaded.model.to(plan.torch_device)
    app = create_app(loaded, plan, model_name=NAME, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(loaded):
    with running(loaded, api_key=KEY) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(loaded, tokenizer, prompt: str, steps: int) -> str:
    """The greedy continuation computed straight from the model, without a cache."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    new = []
    model = loaded.model
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + new], device=next(model.parameters()).device))[0]
            token = int(logits[0, -1].argmax())
            if token == 2:
                break
            new.append(token)
    return tokenizer.decode(new)


def test_completions_with_the_openai_client(client, loaded, tokenizer):
    prompt = "def main("
    response = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert choice.text == greedy(loaded, tokenizer, prompt, 8)
    assert choice.finish_reason in ("stop", "length")
    # Text prompts start with BOS, like every training document.
    assert response.usage.prompt_tokens == 1 + len(tokenizer.encode(prompt))
    assert 0 < response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    # Sampling is reproducible by seed; n and a list of prompts give prompts x n choices.
    sampled = dict(model=NAME, max_tokens=6, temperature=1.0, top_p=0.9, seed=7, extra_body={"top_k": 20})
    first = client.completions.create(prompt=["import ", "class "], n=2, **sampled)
    again = client.completions.create(prompt=["import ", "class "], n=2, **sampled)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.prompt_tokens == 2 + len(tokenizer.encode("import ")) + len(tokenizer.encode("class "))

    # max_tokens may run past the context: the sampler slides its window.
    context = loaded.config.model.context_length
    long = client.completions.create(model=NAME, prompt="def ", max_tokens=context + 10, temperature=0)
    assert long.choices[0].finish_reason == "stop" or long.usage.completion_tokens == context + 10


def test_stop_strings(client, loaded, tokenizer):
    full = greedy(loaded, tokenizer, "x = ", 16)
    assert len(full) >= 4, full
    stop = full[2:4]
    response = client.completions.create(model=NAME, prompt="x = ", max_tokens=16, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_chat_completions(client, loaded, tokenizer):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Say hi."}]
    response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    message = response.choices[0].message
    assert message.role == "assistant"
    expected = greedy(loaded, tokenizer, "System: You write Python.\n\nUser: Say hi.\n\nAssistant:", 6)
    for stop in ("\nUser:", "\nSystem:"):
        expected = expected.split(stop)[0]
    assert message.content == expected
    assert response.usage.prompt_tokens == 1 + len(tokenizer.encode("System: You write Python.\n\nUser: Say hi.\n\nAssistant:"))


def test_streaming(client):
    request = dict(model=NAME, prompt="for i in ", max_tokens=10, temperature=0)
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(stream=True, **request))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    chat = dict(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0)
    stream = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat))
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == client.chat.completions.create(**chat).choices[0].message.content
    assert stream[0].choices[0].delta.role == "assistant"
    assert stream[-1].choices == [] and stream[-1].usage.total_tokens > 0


def test_raw_sse_format(server):
    url, _ = server
    body = {"model": NAME, "prompt": "a", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == NAME for c in chunks)


def test_thirty_two_concurrent_clients(client):
    def ask(i: int) -> tuple[str, str, int]:
        response = client.completions.create(model=NAME, prompt=f"value_{i} = ", max_tokens=4, temperature=0.8, seed=i)
        choice = response.choices[0]
        return choice.text, choice.finish_reason, response.usage.completion_tokens

    # Seeded sampling gives the same text whether a request runs alone or among 31 others.
    alone = [ask(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        under_load = list(pool.map(ask, range(32)))
    assert under_load == alone
    assert all(reason in ("stop", "length") and tokens >= 1 for _, reason, tokens in alone)
    assert len({text for text, _, _ in alone}) > 1


def test_bad_requests_get_their_status(server, loaded):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    context = loaded.config.model.context_length
    ok = {"model": NAME, "prompt": "a", "max_tokens": 2}
    cases = [
        (400, "invalid_json", {"content": b"{not json"}),
        (400, "invalid_json", {"json": [1, 2]}),
        (400, "invalid_json", {"content": b'{"prompt": ' + b"[" * 100_000}),
        (400, "invalid_json", {"content": b"\xff\xfe"}),
        (413, "body_too_large", {"content": b'{"prompt": "' + b"x" * (5 << 20) + b'"}'}),
        (400, "invalid_request", {"json": {**ok, "frobnicate": 1}}),
        (400, "invalid_request", {"json": {"model": NAME, "max_tokens": 2}}),
        (400, "invalid_request", {"json": {**ok, "max_tokens": 0}}),
        (400, "invalid_request", {"json": {**ok, "max_tokens": 10**9}}),
        (400, "invalid_request", {"json": {**ok, "max_tokens": "2"}}),
        (400, "invalid_request", {"json": {**ok, "temperature": -1}}),
        (400, "invalid_request", {"json": {**ok, "top_p": 0}}),
        (400, "invalid_request", {"json": {**ok, "top_k": -3}}),
        (400, "invalid_request", {"json": {**ok, "n": 0}}),
        (400, "invalid_request", {"json": {**ok, "stop": ["a", "b", "c", "d", "e"]}}),
        (400, "invalid_request", {"json": {**ok, "prompt": [10**6]}}),
        (400, "invalid_request", {"json": {**ok, "prompt": []}}),
        (400, "unsupported_parameter", {"json": {**ok, "echo": True}}),
        (400, "context_length_exceeded", {"json": {**ok, "prompt": [5] * (context + 1)}}),
        (400, "context_length_exceeded", {"json": {**ok, "prompt": "x" * (40 * context)}}),
        (404, "model_not_found", {"json": {**ok, "model": "gpt-4"}}),
    ]
    with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
        for status, code, request in cases:
            response = http.post("/v1/completions", **request)
            assert response.status_code == status, (request, response.text)
            error = response.json()["error"]
            assert error["code"] == code and error["message"] and error["type"], (request, error)
        chat = {"model": NAME, "messages": [{"role": "tool", "content": "x"}]}
        assert http.post("/v1/chat/completions", json=chat).status_code == 400
        assert http.post("/v1/chat/completions", json={"model": NAME, "messages": []}).status_code == 400
        assert http.post("/v1/chat/completions", json={"model": NAME, "messages": "hi"}).status_code == 400
        missing = http.get("/v1/nothing-here")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert http.get("/v1/completions").status_code == 405
        assert http.get("/v1/models/other").status_code == 404
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [NAME]
    for headers, code in [({}, "missing_api_key"), ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
                          ({"Authorization": KEY}, "missing_api_key")]:
        response = httpx.post(url + "/v1/completions", json=ok, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == code
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
    # Health needs no key, and the server survived everything above.
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok"
    # The weights held beside the plan's figure for them, within 15% (here on one CPU, exactly what was planned).
    [(device, weights)] = health["weights_bytes"].items()
    assert device == "cpu" and abs(weights["in_use"] - weights["planned"]) <= 0.15 * weights["planned"]
    assert httpx.post(url + "/v1/completions", json=ok, headers=auth).status_code == 200


def test_sampling_parameters_follow_the_samplers_rules_plus_the_api_caps(server, loaded, cli, tiny_checkpoint):
    url, _ = server
    ok = {"model": NAME, "prompt": "a", "max_tokens": 2}

    def refused(**changes):
        response = httpx.post(url + "/v1/completions", json={**ok, **changes}, headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 400, (changes, response.text)
        error = response.json()["error"]
        return error["param"], error["message"]

    def rule(**setting):
        with pytest.raises(SamplingError) as caught:
            SamplingSettings(**setting)
        return caught.value

    # One rule, one message: the server says what generate says, naming the parameter as the API does.
    for flag, param, value in (("--temperature", "temperature", -1.5), ("--top-p", "top_p", 1.5), ("--top-k", "top_k", -1)):
        message = str(rule(**{param: value}))
        assert refused(**{param: value}) == (param, message)
        generate = cli("generate", tiny_checkpoint, flag, str(value))
        assert generate.code == 2 and f"error: {message}\n" in generate.err
    assert refused(max_tokens=0) == ("max_tokens", rule(max_new_tokens=0).message("max_tokens"))
    assert refused(n=0) == ("n", rule(num_samples=0).message("n"))
    assert refused(stop=["x", ""]) == ("stop", rule(stop=("",)).message("stop"))

    # What only the API limits: values the sampler itself takes.
    limit = loaded.config.serve.max_tokens_limit
    SamplingSettings(temperature=2.5, max_new_tokens=limit + 1, num_samples=MAX_CHOICES + 1, stop=("a",) * (MAX_STOP + 1))
    assert refused(temperature=2.5) == ("temperature", "temperature must be at most 2 here, got 2.5")
    assert refused(max_tokens=limit + 1) == ("max_tokens", f"max_tokens must be at most {limit} on this server, got {limit + 1}")
    assert refused(n=MAX_CHOICES + 1)[0] == "n"
    assert refused(prompt=["a", "b"], n=MAX_CHOICES // 2 + 1)[0] == "n"
    assert refused(stop=["a"] * (MAX_STOP + 1))[0] == "stop"
    assert refused(seed=1 << 64) == ("seed", "seed must fit in 64 bits")
    assert httpx.post(url + "/v1/completions", json={**ok, "temperature": 2, "seed": (1 << 64) - 1},
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_int8_weights_serve_like_the_model(loaded, tokenizer):
    config = copy.deepcopy(loaded.config)
    config.sample.quantize = "int8"
    with running(dataclasses.replace(loaded, config=config)) as (url, app):
        assert httpx.get(url + "/health").json()["decode_weights"] == "int8"
        assert isinstance(app.state.engine.sampler.decoder.head, Int8Weight)
        body = {"model": NAME, "prompt": "def main(", "max_tokens": 3, "temperature": 0}
        text = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
    # Three greedy tokens of a trained model: int8 weights keep the clear winners.
    assert text == greedy(loaded, tokenizer, "def main(", 3)


def test_saturated_server_answers_503(loaded):
    serve = dataclasses.replace(loaded.config.serve, max_concurrency=1, max_queue=1)
    with running(loaded, serve=serve) as (url, app):
        engine = app.state.engine
        body = {"model": NAME, "prompt": "a", "max_tokens": 2}
        with ThreadPoolExecutor(2) as pool, engine.lock:
            # With the model held, one request is admitted and one waits: the server is full.
            pending = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=30) for _ in range(2)]
            deadline = time.monotonic() + 10
            while engine.in_flight < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            busy = httpx.post(url + "/v1/completions", json=body)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
            assert busy.headers["retry-after"] == "1"
            assert httpx.get(url + "/health").status_code == 200
        assert [f.result().status_code for f in pending] == [200, 200]


def test_disconnected_stream_stops_its_generation(loaded):
    with running(loaded) as (url, app):
        engine = app.state.engine
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": loaded.config.model.context_length // 2}
        with engine.lock:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body) as response:
                # The first chunk (the assistant role) comes before any token; then the client hangs up.
                assert next(response.iter_lines()).startswith("data: ")
            deadline = time.monotonic() + 10
            # Either the job waits for the model, cancelled, or the engine thread (scheduled late on a busy
            # machine) met it already cancelled and dropped it: both mean no step ran after the hang-up.
            while not (engine.jobs and engine.jobs[0].cancelled) and not engine.stats["cancelled"]:
                assert time.monotonic() < deadline, "the server did not notice the disconnect"
                time.sleep(0.01)
        while engine.in_flight:
            assert time.monotonic() < deadline + 10
            time.sleep(0.01)
        assert engine.stats == {"completed": 0, "cancelled": 1, "failed": 0}


def test_metrics_count_what_was_sent(loaded):
    with running(loaded, api_key=KEY) as (url, app):
        auth = {"Authorization": f"Bearer {KEY}"}
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        usages = [client.completions.create(model=NAME, prompt=f"x{i} = ", max_tokens=3 + i, temperature=0).usage
                  for i in range(3)]
        usages.append(client.completions.create(model=NAME, prompt=["a", "b"], n=2, max_tokens=4, seed=1).usage)
        streamed = list(client.completions.create(model=NAME, prompt="for ", max_tokens=5, stream=True,
                                                  stream_options={"include_usage": True}))
        usages.append(streamed[-1].usage)
        usages.append(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=3).usage)
        for bad in ({"max_tokens": 0}, {"temperature": -1}):
            assert httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "a", **bad}, headers=auth).status_code == 400
        assert httpx.get(url + "/metrics").status_code == 401
        text = httpx.get(url + "/metrics", headers=auth)
        assert text.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text.text)}

    def value(family, sample, **labels):
        return next(s.value for s in families[family].samples if s.name == sample and s.labels == labels)

    assert value("hetlm_requests", "hetlm_requests_total", endpoint="/v1/completions", status="200") == 5
    assert value("hetlm_requests", "hetlm_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value("hetlm_requests", "hetlm_requests_total", endpoint="/v1/completions", status="400") == 2
    assert value("hetlm_requests", "hetlm_requests_total", endpoint="/metrics", status="401") == 1
    assert value("hetlm_prompt_tokens", "hetlm_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert value("hetlm_completion_tokens", "hetlm_completion_tokens_total") == sum(u.completion_tokens for u in usages)
    for histogram in ("hetlm_time_to_first_token_seconds", "hetlm_request_latency_seconds"):
        assert value(histogram, histogram + "_count") == 6
        assert 0 < value(histogram, histogram + "_sum")
    assert 1 <= value("hetlm_time_per_output_token_seconds", "hetlm_time_per_output_token_seconds_count") <= 6
    assert value("hetlm_slots_active", "hetlm_slots_active") == 0 and value("hetlm_queue_depth", "hetlm_queue_depth") == 0
    assert value("hetlm_slots", "hetlm_slots") == app.state.engine.slots


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_slots_are_freed_after_many_requests_and_disconnects(loaded):
    serve = dataclasses.replace(loaded.config.serve, max_concurrency="6", max_queue=64)
    with running(loaded, serve=serve) as (url, app):
        engine = app.state.engine
        host, port = url.removeprefix("http://").split(":")

        def one(i: int) -> str:
            body = {"model": NAME, "prompt": f"v{i} = ", "max_tokens": 2 + i % 3, "temperature": 0.8, "seed": i}
            if i % 4 == 0:  # streams, and hangs up after the first chunk
                with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True, "max_tokens": 500},
                                  timeout=60) as response:
                    next(response.iter_lines())
                return "left"
            if i % 4 == 1:  # does not stream, and hangs up once the request is sent
                raw = json.dumps({**body, "max_tokens": 500}).encode()
                with socket.create_connection((host, int(port))) as sock:
                    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
                return "left"
            response = httpx.post(url + "/v1/completions", json=body, timeout=60)
            return str(response.status_code)

        def settle():
            deadline = time.monotonic() + 60
            while engine.in_flight or engine.slots_in_use:
                assert time.monotonic() < deadline, (engine.in_flight, engine.slots_in_use)
                time.sleep(0.02)

        with ThreadPoolExecutor(12) as pool:
            list(pool.map(one, range(40)))
            settle()
            gc.collect()
            before = rss_bytes()
            outcomes = list(pool.map(one, range(40, 240)))
        settle()
        gc.collect()
        grown = rss_bytes() - before
        assert outcomes.count("200") == 100 and outcomes.count("left") == 100, outcomes
        stats = engine.stats
        assert stats["failed"] == 0 and stats["completed"] >= 100 and sum(stats.values()) == 240
        assert engine.batch.rows == [] and not engine.batch.prefills and engine.waiting == 0
        assert not [o for o in gc.get_objects() if type(o) is Job], "jobs outlived their requests"
        health = httpx.get(url + "/health").json()
        assert health["in_flight"] == 0 and health["slots_in_use"] == 0
    assert grown < 20 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 requests"


def test_bind_warning():
    assert bind_warning("127.0.0.1", None) is None
    assert bind_warning("0.0.0.0", "key") is None
    assert "without an API key" in bind_warning("0.0.0.0", None)


def test_serve_cli(tiny_checkpoint, loaded, tokenizer, tmp_path, cli, monkeypatch):
    bundle = deploy(tiny_checkpoint, tmp_path / "my-model")
    assert cli("serve", tmp_path / "nothing").code == 2
    bad_port = cli("serve", bundle, "--port", "70000")
    assert bad_port.code == 2 and "serve.port" in bad_port.err
    shape = cli("serve", bundle, "--set", "model.n_layers=3")
    assert shape.code == 2 and "only serve.*" in shape.err
    slots = cli("serve", bundle, "--max-concurrency", "0")
    assert slots.code == 2 and "serve.max_concurrency must be auto or a positive integer" in slots.err
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    for args, message in ((("--api-key", KEY, "--api-key-file", key_file), "one way"),
                          (("--api-key-file", tmp_path / "absent"), "not found"),
                          (("--api-key-file", tmp_path / "empty"), "is empty")):
        refused = cli("serve", bundle, *args)
        assert refused.code == 2 and message in refused.err, refused.err
    # The key from the environment, when no option gives one.
    monkeypatch.setenv("HETLM_API_KEY", "from-env")
    assert resolve_api_key(None, None) == "from-env" and resolve_api_key("given", None) == "given"
    assert resolve_api_key(None, key_file) == KEY
    monkeypatch.setenv("HETLM_API_KEY", "")
    assert resolve_api_key(None, None) is None
    env = {k: v for k, v in os.environ.items() if k != "HETLM_API_KEY"}
    process = subprocess.Popen([sys.executable, "-m", "hetlm", "serve", str(bundle), "--port", "0", "--api-key-file",
                                str(key_file), "--set", "serve.max_concurrency=3"],
                               stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent.parent)
    try:
        port, banner = None, []
        for line in process.stderr:
            banner.append(line)
            match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "the server did not report its address"
        assert "3 sequences at once, one batched step" in "".join(banner), banner
        assert "slots: set by serve.max_concurrency" in "".join(banner), banner
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert client.models.list().data[0].id == "my-model"
        text = client.completions.create(model="my-model", prompt="a", max_tokens=2, temperature=0).choices[0].text
        assert text == greedy(loaded, tokenizer, "a", 2)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").json()["slots"] == 3
    finally:
        process.terminate()
        process.wait(timeout=30)
