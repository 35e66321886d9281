"""``hetlm config show``."""

from __future__ import annotations

import typer

from hetlm.cli.app import app
from hetlm.cli.options import ConfigOption, SetOption
from hetlm.cli.render import stdout
from hetlm.config import load_config

config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved configuration (defaults < --config file < --set) as YAML."""
    resolved = load_config(config, set_ or [])
    stdout.print(resolved.to_yaml(), end="", highlight=False, markup=False)
