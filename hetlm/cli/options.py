"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file (see configs/).", show_default=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable).", show_default=False),
]
OutOption = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Run folder (default: runs/<config name>).", show_default=False),
]
