"""``hetlm deploy``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hetlm.cli.app import app
from hetlm.cli.render import RichReporter, stdout
from hetlm.deploy import deploy
from hetlm.model import DTYPES

TargetArgument = Annotated[Path, typer.Argument(help="A run folder, a checkpoint folder or a bundle.", show_default=False)]


@app.command("deploy")
def deploy_command(
    target: TargetArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle folder to write.", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help=f"Weights dtype: {', '.join(DTYPES)}.")] = "fp32",
    latest: Annotated[bool, typer.Option("--latest", help="Take a run's newest checkpoint instead of its best.")] = False,
) -> None:
    """Write a self-contained bundle that hetlm and Hugging Face transformers both load."""
    with RichReporter() as reporter:
        path = deploy(target, out, dtype=dtype, prefer="latest" if latest else "best", reporter=reporter)
        reporter.info(f"bundle written to {path} ({dtype})")
    stdout.print(str(path), highlight=False, markup=False)
