"""``hetlm config show`` and ``hetlm config keys``."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hetlm.cli.app import Group, Typer, app, examples
from hetlm.cli.options import ConfigOption, SetOption
from hetlm.cli.render import stdout
from hetlm.config import KeyInfo, describe_keys, load_config
from hetlm.errors import UsageError

config_app = Typer(help="Inspect configuration: the resolved settings and every key.", no_args_is_help=True, cls=Group,
                   epilog=examples("hetlm config show --config configs/tiny.yaml", "hetlm config keys"))
app.add_typer(config_app, name="config")


@config_app.command("show", epilog=examples(
    "hetlm config show --config configs/tiny.yaml",
    "hetlm config show --config configs/tiny.yaml --set train.learning_rate=1e-3",
))
def show(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved configuration (defaults < --config file < --set) as YAML."""
    resolved = load_config(config, set_ or [])
    stdout.print(resolved.to_yaml(), end="", highlight=False, markup=False)


@config_app.command("keys", epilog=examples("hetlm config keys", "hetlm config keys --json"))
def keys(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the Markdown table of the README instead.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON list of {key, type, default, help, choices} instead.")] = False,
) -> None:
    """List every configuration key with its type (or allowed values), default and meaning."""
    if markdown and as_json:
        raise UsageError("--markdown and --json exclude each other")
    described = describe_keys()
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(info) for info in described], indent=2))
    elif markdown:
        typer.echo(keys_markdown(described))
    else:
        stdout.print(_keys_table(described))


def keys_markdown(described: tuple[KeyInfo, ...]) -> str:
    """The README's configuration table."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{info.key}` | {_cell(info.kind)} | `{info.default_text}` | {_cell(info.help)} |" for info in described]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _keys_table(described: tuple[KeyInfo, ...]) -> Table:
    # Type and default sit under the key, so the meaning keeps most of the width even on an 80-column terminal.
    table = Table(title="Configuration keys (--config FILE, --set section.key=value)", title_justify="left",
                  show_lines=True)
    table.add_column("key: type = default")
    table.add_column("meaning")
    for info in described:
        table.add_row(f"[bold]{escape(info.key)}[/]\n[dim]{escape(info.kind)} = {escape(info.default_text)}[/]",
                      escape(info.help))
    return table
