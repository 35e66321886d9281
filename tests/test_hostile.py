"""Hostile and careless clients against a real server on 127.0.0.1: every one gets a 4xx (or is cut off), none a 5xx.

Each test here failed before its fix: lone surrogates and tiny sampling values gave 500s, huge prompts were
tokenised on the event loop, a body over the limit was read to its end first, connections that never sent a
request stayed open for ever, an abandoned non-streaming request kept generating, and seeds aliased.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve import NAME, greedy, running

from hetlm.serve.protocol import MAX_BODY_BYTES

TIMEOUT = 20


class WatchedTokenizer:
    """The real tokenizer, noting the length of each text it encodes and whether an event loop runs on that thread."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[tuple[int, bool]] = []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append((len(text), on_loop))
        return self.tokenizer.encode(text)


@pytest.fixture(scope="module")
def watched(tokenizer):
    return WatchedTokenizer(tokenizer)


@pytest.fixture(scope="module")
def server(loaded, watched):
    serve = dataclasses.replace(loaded.config.serve, header_timeout=1.0, keep_alive_timeout=1.0)
    with running(loaded, serve=serve, tokenizer=watched) as (url, app):
        yield url, app


def post(url, raw: bytes, path="/v1/completions"):
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


def address(url):
    parsed = urlparse(url)
    return parsed.hostname, parsed.port


def connect(url) -> socket.socket:
    sock = socket.create_connection(address(url), timeout=TIMEOUT)
    return sock


def status_of(sock) -> int:
    """The status code of the response the server sends on ``sock``."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection without answering"
        data += chunk
    return int(data.split(b" ", 2)[1])


def closed_by_server(sock) -> bool:
    """True once the server closes ``sock`` (reading whatever it still sends); False if it is still open at TIMEOUT."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_lone_surrogates_are_refused_as_bad_requests(server):
    url, _ = server
    model = json.dumps(NAME)
    cases = [
        (400, "prompt", b'{"model": %s, "prompt": "\\ud800", "max_tokens": 2}' % model.encode()),
        (400, "prompt", b'{"model": %s, "prompt": ["fine", "a\\udfffb"], "max_tokens": 2}' % model.encode()),
        (404, "model", b'{"model": "\\ud800", "prompt": "a", "max_tokens": 2}'),
        (400, None, b'{"model": %s, "prompt": "a", "\\ud800": 1}' % model.encode()),
    ]
    for status, param, raw in cases:
        response = post(url, raw)
        assert response.status_code == status, (raw, response.text)
        assert response.json()["error"]["param"] == param
    chat = [b'{"model": %s, "messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}',
            b'{"model": %s, "messages": [{"role": "\\ud800", "content": "hi"}], "max_tokens": 2}',
            b'{"model": %s, "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}']
    for raw in chat:
        response = post(url, raw % model.encode(), "/v1/chat/completions")
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text
    # A stop string that no text can contain is harmless.
    response = post(url, b'{"model": %s, "prompt": "a", "max_tokens": 2, "stop": "\\ud800"}' % model.encode())
    assert response.status_code == 200


def test_lone_surrogate_prompt_is_a_usage_error_in_the_cli(cli, tiny_checkpoint):
    # What Python makes of the bytes ED A0 80 (an encoded surrogate) in argv.
    result = cli("generate", tiny_checkpoint, "--prompt", "\udced\udca0\udc80", "-n", "2")
    assert result.code == 2 and "not valid Unicode" in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1 and result.out == ""


def test_tiny_temperatures_and_top_p_sample_without_overflow(server, loaded, tokenizer):
    url, _ = server
    expected = greedy(loaded, tokenizer, "def main(", 4)
    for extra in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 1e-300}, {"temperature": 1e-300, "top_p": 1e-300},
                  {"temperature": 2, "top_p": 1e-300}, {"temperature": 2, "top_k": 1}):
        body = {"model": NAME, "prompt": "def main(", "max_tokens": 4, "seed": 3, **extra}
        response = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert response.status_code == 200, (extra, response.text)
        # Each keeps only the likeliest token.
        assert response.json()["choices"][0]["text"] == expected, extra


def test_huge_prompts_are_refused_before_they_are_tokenised_and_never_on_the_event_loop(server, watched, loaded):
    url, _ = server
    context = loaded.config.model.context_length
    watched.calls.clear()
    huge = {"model": NAME, "prompt": "x = 1; " * 557_000, "max_tokens": 2}  # 3.9 MB
    response = httpx.post(url + "/v1/completions", json=huge, timeout=TIMEOUT)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    many = {"model": NAME, "prompt": ["a"] * 10_000, "max_tokens": 2}
    response = httpx.post(url + "/v1/completions", json=many, timeout=TIMEOUT)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    ids = {"model": NAME, "prompt": [[5] * 3] * 10_000, "max_tokens": 2}
    assert httpx.post(url + "/v1/completions", json=ids, timeout=TIMEOUT).status_code == 400
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}] * 100_000, "max_tokens": 2}
    response = httpx.post(url + "/v1/chat/completions", json=chat, timeout=TIMEOUT)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert watched.calls == []
    # A prompt that fits is tokenised, off the event loop, and one just over the context in tokens still is.
    ok = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "def f(", "max_tokens": 2}, timeout=TIMEOUT)
    over = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "a b " * context, "max_tokens": 2},
                      timeout=TIMEOUT)
    assert ok.status_code == 200 and over.status_code == 400
    assert [on_loop for _, on_loop in watched.calls] == [False, False]


def test_bodies_over_the_limit_are_refused_without_reading_them(server):
    url, _ = server
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**12}\r\n\r\n").encode()
    with connect(url) as sock:
        sock.sendall(head + b'{"model": ')
        assert status_of(sock) == 413
    # Chunked: cut off once past the limit, without waiting for the end the client never sends.
    with connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * (1 << 20)
        for _ in range(MAX_BODY_BYTES // len(piece) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert status_of(sock) == 413
    assert httpx.get(url + "/health").status_code == 200


def test_connections_that_send_no_request_are_closed(server):
    url, _ = server
    with connect(url) as silent, connect(url) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert closed_by_server(silent) and closed_by_server(slow)
    # Idle after a response: the keep-alive timeout.
    with connect(url) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(idle) == 200
        assert closed_by_server(idle)
    with connect(url) as big:
        big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * (100 << 10) + b"\r\n\r\n")
        # h11 refuses a head that grows past the bound while it arrives (400); one read whole, the app does (431).
        assert status_of(big) in (400, 431)


def test_connections_beyond_the_limit_are_answered_503(loaded):
    serve = dataclasses.replace(loaded.config.serve, max_connections=3, header_timeout=60.0)
    with running(loaded, serve=serve) as (url, _):
        with contextlib.ExitStack() as stack:
            for _ in range(3):
                stack.enter_context(connect(url))
            # Refused once the server's loop has taken the three idle connections in.
            deadline = time.monotonic() + TIMEOUT
            while httpx.get(url + "/health", timeout=TIMEOUT).status_code != 503:
                assert time.monotonic() < deadline, "a fourth connection was served"
                time.sleep(0.05)
        deadline = time.monotonic() + TIMEOUT
        while httpx.get(url + "/health", timeout=TIMEOUT).status_code != 200:
            assert time.monotonic() < deadline


def test_an_abandoned_request_that_does_not_stream_frees_its_slot(loaded):
    with running(loaded) as (url, app):
        engine = app.state.engine
        body = json.dumps({"model": NAME, "prompt": "for ", "max_tokens": 4000}).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        with engine.lock:
            with connect(url) as sock:
                sock.sendall(request)
                deadline = time.monotonic() + TIMEOUT
                while not engine.jobs:
                    assert time.monotonic() < deadline, "the request never reached the engine"
                    time.sleep(0.01)
            # Hung up while the job waits for the model: no step runs for it after this.
            while not engine.jobs[0].cancelled:
                assert time.monotonic() < deadline, "the server did not notice the disconnect"
                time.sleep(0.01)
        while engine.in_flight or engine.slots_in_use:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.stats == {"completed": 0, "cancelled": 1, "failed": 0}
        # Counted as answered with 499; nothing was answered with a 5xx.
        statuses = requests_by_status(httpx.get(url + "/metrics").text)
        assert statuses == {("/v1/completions", "499"): 1}


def requests_by_status(metrics: str) -> dict[tuple[str, str], float]:
    family = next(f for f in text_string_to_metric_families(metrics) if f.name == "hetlm_requests")
    return {(s.labels["endpoint"], s.labels["status"]): s.value for s in family.samples if s.name == "hetlm_requests_total"
            and s.labels["endpoint"] != "/metrics"}


def test_seeds_neither_alias_nor_depend_on_the_other_prompts(server):
    url, _ = server

    def texts(prompt, seed):
        body = {"model": NAME, "prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": seed}
        response = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return [c["text"] for c in response.json()["choices"]]

    for a, b in ((5, 5 + 2**63), (-1, 2**64 - 1), (5, 5 + 2**32), (0, -(2**63))):
        assert texts("import ", a) != texts("import ", b), (a, b)
    assert texts("import ", 5) == texts("import ", 5)
    assert texts(["import ", "class ", "import "], 7) == [texts("import ", 7)[0], texts("class ", 7)[0], texts("import ", 7)[0]]


def test_no_request_here_was_answered_with_a_5xx(server):
    # Runs last in this module, over the shared server's whole history of hostile requests.
    url, _ = server
    statuses = requests_by_status(httpx.get(url + "/metrics").text)
    assert statuses and not any(status.startswith("5") for _, status in statuses), statuses
    assert sum(v for (_, status), v in statuses.items() if status.startswith("4")) >= 15
    assert httpx.get(url + "/health").json()["slots_in_use"] == 0
