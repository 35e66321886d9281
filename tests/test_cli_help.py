"""An option that sets a configuration key shows the key's help and default, declared once in hetlm.config."""

from __future__ import annotations

import re

import pytest

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
