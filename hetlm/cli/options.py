"""Options shared by several commands, and the help of options that set a configuration key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from hetlm.config import describe_key

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file (see configs/).", show_default=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable).", metavar="<key=value>",
                 show_default=False),
]
OutOption = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Run folder \\[default: runs/<config name>].", show_default=False),
]


def key_help(key: str) -> str:
    """The help of an option that sets ``key``: the key's own help, allowed values and built-in default.

    The option's value replaces the key's, which comes from the config (--config, --set, or the model's saved one),
    so the default names the key as well as its built-in value.
    """
    info = describe_key(key)
    choices = f" [{info.kind}]" if info.choices else ""
    # Escaped: the app renders help as Rich markup, which would take [default: ...] for a tag.
    return escape(f"{info.help}{choices} [default: {key}, {info.default_text}]")


# The sampling options of the commands that sample (generate, chat); None keeps the model's sample.* setting.
MaxNewTokensOption = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", "-n", help=key_help("sample.max_new_tokens"), show_default=False)]
TemperatureOption = Annotated[Optional[float], typer.Option(
    "--temperature", "-t", help=key_help("sample.temperature"), show_default=False)]
TopKOption = Annotated[Optional[int], typer.Option("--top-k", help=key_help("sample.top_k"), show_default=False)]
TopPOption = Annotated[Optional[float], typer.Option("--top-p", help=key_help("sample.top_p"), show_default=False)]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help=key_help("sample.seed"), show_default=False)]
QuantizeOption = Annotated[Optional[str], typer.Option(
    "--quantize", help=key_help("sample.quantize"), show_default=False)]
