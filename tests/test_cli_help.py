"""An option that sets a configuration key shows the key's help and default, declared once in hetlm.config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from hetlm.cli import app
from hetlm.cli.options import key_help
from hetlm.config import describe_key


def _words(text: str) -> str:
    """Text with Rich's panel borders and line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_key_help_states_the_fields_help_choices_and_default():
    assert key_help("data.vocab_size") == describe_key("data.vocab_size").help + r" \[default: data.vocab_size, 4096]"
    assert key_help("data.tokenizer").endswith(r"than bpe \[bpe|unigram] \[default: data.tokenizer, bpe]")
    assert key_help("train.max_time").endswith(r'\[default: train.max_time, ""]')


@pytest.mark.parametrize("command, option, key", [
    ("preprocess", "--vocab-size", "data.vocab_size"),
    ("preprocess", "--tokenizer", "data.tokenizer"),
    ("preprocess", "--workers -j", "data.workers"),
    ("train", "--max-time", "train.max_time"),
    ("eval", "--stride", "eval.stride"),
    ("generate", "--temperature -t", "sample.temperature"),
    ("generate", "--quantize", "sample.quantize"),
    ("chat", "--temperature -t", "sample.temperature"),
    ("serve", "--port", "serve.port"),
])
def test_option_help_comes_from_the_field(cli, command, option, key):
    result = cli(command, "--help")
    assert result.code == 0
    info = describe_key(key)
    choices = f" [{info.kind}]" if info.choices else ""
    shown = f"{option} <{info.type}> {info.help}{choices} [default: {key}, {info.default_text}]"
    assert shown in _words(result.out)


def _command_paths(group, prefix: str = "") -> list[str]:
    paths = []
    for name, command in group.commands.items():
        paths.append(prefix + name)
        if hasattr(command, "commands"):
            paths += _command_paths(command, f"{prefix}{name} ")
    return paths


# Taken from the app, so that a command added later without examples fails here.
COMMANDS = _command_paths(typer.main.get_command(app))
# What `make demo` leaves behind, so that an example reading a run, bundle or data folder can be run after it.
DEMO_OUTPUTS = {"data/python-stdlib", "runs/tiny", "bundles/tiny"}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def wide_help(cli, monkeypatch):
    """A command's --help at 200 columns, so that Rich wraps no example line."""
    monkeypatch.setenv("COLUMNS", "200")

    def show(command: str) -> str:
        result = cli(*command.split(), "--help")
        assert result.code == 0, result.err
        return result.out

    return show


def _examples(help_text: str) -> list[str]:
    after = help_text.split("Examples:", 1)[1]
    return [line.strip() for line in after.strip().splitlines() if line.strip()]


def _parse(argv: list[str]) -> None:
    """Parse ``argv`` (after ``hetlm``) as the CLI would, without running the command."""
    command = typer.main.get_command(app)
    while argv and argv[0] in getattr(command, "commands", {}):
        command = command.commands[argv.pop(0)]
    command.make_context(command.name, argv)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_examples_that_parse(wide_help, command):
    examples = _examples(wide_help(command))
    assert 1 <= len(examples) <= 3
    # The alias's help shows the examples of the command it stands for.
    prefix = "hetlm " + ("eval" if command == "evaluate" else command)
    for line in examples:
        assert line == prefix or line.startswith(prefix + " "), line
        argv = shlex.split(line)
        _parse(argv[1:])
        outputs = {argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--out", "-o")}
        for arg in argv[1:]:
            if arg in outputs or arg.startswith("-") or "*" in arg:
                continue
            if arg.split("/")[0] in ("data", "runs", "bundles"):
                assert arg in DEMO_OUTPUTS, f"{line}: {arg} is not made by make demo"
            elif "/" in arg or Path(arg).suffix in (".md", ".yaml", ".py", ".json"):
                assert (REPO / arg).exists(), f"{line}: {arg} is not in the repository"


def test_an_example_with_an_unknown_option_does_not_parse():
    with pytest.raises(Exception, match="--no-such-option"):
        _parse(["eval", "runs/tiny", "--no-such-option"])


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_switches_show_no_type(wide_help, command):
    text = wide_help(command)
    assert "<bool>" not in text and "BOOLEAN" not in text


def test_a_switch_is_followed_by_its_help(wide_help):
    assert re.search(r"--json +Print one JSON", wide_help("eval"))


@pytest.mark.parametrize("command, usage", [
    ("eval", "Usage: hetlm eval [OPTIONS] TARGET [TEXT_FILE]..."),
    ("generate", "Usage: hetlm generate [OPTIONS] TARGET [-]"),
    ("train", "Usage: hetlm train [OPTIONS] [RUN]"),
    ("deploy", "Usage: hetlm deploy [OPTIONS] TARGET"),
])
def test_usage_names_the_arguments(wide_help, command, usage):
    assert usage in wide_help(command)
