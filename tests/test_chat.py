"""``hetlm chat`` and the ``Conversation`` behind it: piped turns, commands, trimming, Ctrl-C through a terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_error

from hetlm.chat import CHAT_STOP, Conversation, render_chat
from hetlm.reporting import Reporter
from hetlm.sampling import Sampler, encode_prompt, make_generator
from hetlm.sampling_settings import SamplingSettings

ROOT = Path(__file__).resolve().parents[1]
# One thread: the planner's one per core crawls when other processes keep the cores busy.
CHAT = ("--temperature", "0", "--set", "device.threads=1")


@pytest.fixture(scope="module")
def sampler(loaded, tokenizer):
    return Sampler(loaded.model, tokenizer)


def greedy_reply(sampler, messages, max_new_tokens):
    """What the model says next to ``messages``, sampled here without the chat code: the reference."""
    ids = encode_prompt(sampler.tokenizer, render_chat(messages, add_generation_prompt=True))
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0, stop=CHAT_STOP)
    return sampler.generate(ids, settings, make_generator(0)).text.strip()


def test_piped_turns_see_the_history_and_obey_the_commands(cli, tiny_checkpoint, sampler, monkeypatch):
    # Short messages: the tiny model's context of 64 tokens holds both turns and the reply's 8.
    system = {"role": "system", "content": "Terse."}
    first, second = {"role": "user", "content": "def f():"}, {"role": "user", "content": "x = 1"}
    reply1 = greedy_reply(sampler, [system, first], 8)
    reply2 = greedy_reply(sampler, [system, first, {"role": "assistant", "content": reply1}, second], 8)
    # The second turn only matches its reference if the model saw the first one.
    assert reply2 != greedy_reply(sampler, [system, second], 8)
    lines = ["/system Terse.", "def f():", "", "x = 1", "/help", "/nope", "/reset", "def f():", "/exit", "x = 1"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    result = cli("chat", tiny_checkpoint, "-n", "8", *CHAT)
    assert result.code == 0, result.err
    # After /reset only the system message is left, so the first message gets the first reply again; nothing after /exit.
    assert result.out == f"{reply1}\n{reply2}\n{reply1}\n"
    assert "system message set" in result.err and "history cleared" in result.err
    assert "history trimmed" not in result.err
    assert "/system TEXT" in result.err and "unknown command /nope: /help lists the commands" in result.err
    assert "you>" not in result.out + result.err


def test_end_of_input_ends_the_chat(cli, tiny_checkpoint, sampler, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("def main():"))
    result = cli("chat", tiny_checkpoint, "-n", "8", *CHAT, "--system", "You are terse.")
    assert result.code == 0, result.err
    assert result.out == greedy_reply(sampler, [{"role": "system", "content": "You are terse."},
                                                {"role": "user", "content": "def main():"}], 8) + "\n"


class Notes(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_history_is_trimmed_from_the_oldest_turn_to_fit_the_context(sampler):
    # Short replies, so the context holds a few turns: one of them is dropped at a time.
    room = 6
    settings = SamplingSettings(max_new_tokens=room, temperature=0)
    conversation = Conversation(sampler, settings, make_generator(0), system="Be brief.")
    notes = Notes()
    messages = [f"item {i}" for i in range(6)]
    for text in messages:
        reply = "".join(conversation.reply(text, notes))
        # The reply is the model's answer to the history kept, which leaves the reply its room.
        *prompt, last = conversation.messages
        assert last == {"role": "assistant", "content": reply}
        assert reply == greedy_reply(sampler, prompt, room)
        assert len(encode_prompt(sampler.tokenizer, render_chat(prompt))) + room <= sampler.context_length
    assert notes.lines and all(n.startswith("history trimmed: the oldest") for n in notes.lines)
    assert "context of 64 tokens" in notes.lines[0]
    kept = [m["content"] for m in conversation.messages if m["role"] == "user"]
    assert conversation.messages[0] == {"role": "system", "content": "Be brief."}
    assert 2 <= len(kept) < len(messages) and kept == messages[-len(kept):]


def test_the_cli_notes_a_trimmed_history(cli, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"item {i}\n" for i in range(6))))
    result = cli("chat", tiny_checkpoint, "-n", "12", *CHAT)
    assert result.code == 0, result.err
    assert "history trimmed: the oldest" in result.err


def test_an_interrupted_reply_keeps_what_was_shown(sampler):
    conversation = Conversation(sampler, SamplingSettings(max_new_tokens=1000, temperature=0), make_generator(0))
    # A reply budget past the context leaves room for history all the same.
    assert conversation.reply_room == sampler.context_length // 2
    reply = conversation.reply("def main():")
    shown = [next(reply) for _ in range(3)]
    reply.close()
    assert conversation.messages == [{"role": "user", "content": "def main():"},
                                     {"role": "assistant", "content": "".join(shown)}]


def test_a_bad_target_is_one_error_line(cli, tmp_path):
    missing = tmp_path / "missing"
    generate = cli("generate", missing, "--prompt", "x")
    assert one_error(cli("chat", missing), generate.code) == one_error(generate, generate.code)


def _read(fd: int, seen: bytearray, deadline: float) -> None:
    """Add what the terminal shows next to ``seen``."""
    left = deadline - time.monotonic()
    assert left > 0, f"timed out; the terminal showed {bytes(seen)!r}"
    if select.select([fd], [], [], left)[0]:
        try:
            seen += os.read(fd, 4096)
        except OSError:  # the other end is closed: the chat has ended
            raise AssertionError(f"the chat ended; the terminal showed {bytes(seen)!r}") from None


def _read_until(fd: int, seen: bytearray, wanted: bytes, start: int, deadline: float) -> int:
    """Read until ``wanted`` appears in ``seen`` past ``start``; where it ends."""
    while (at := seen.find(wanted, start)) < 0:
        _read(fd, seen, deadline)
    return at + len(wanted)


def test_ctrl_c_in_a_terminal_stops_the_reply_not_the_chat(tiny_checkpoint):
    main, child = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    # A reply far longer than the test: only Ctrl-C ends it.
    process = subprocess.Popen([sys.executable, "-m", "hetlm", "chat", str(tiny_checkpoint), "-n", "1000000", *CHAT],
                               stdin=child, stdout=child, stderr=child, env=env, cwd=ROOT)
    os.close(child)
    seen = bytearray()
    deadline = time.monotonic() + 25
    try:
        at = _read_until(main, seen, b"you> ", 0, deadline)
        os.write(main, b"def main():\n")
        at = _read_until(main, seen, b"def main():\r\n", at, deadline)
        # Some of the reply has streamed: the model is generating when the interrupt comes.
        while len(seen) < at + 40:
            _read(main, seen, deadline)
        process.send_signal(signal.SIGINT)
        at = _read_until(main, seen, b"reply stopped", at, deadline)
        at = _read_until(main, seen, b"you> ", at, deadline)
        os.write(main, b"/exit\n")
        assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, bytes(seen)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(main)
