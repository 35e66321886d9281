"""``hetlm deploy``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hetlm.cli.app import app, examples
from hetlm.cli.render import RichReporter, stdout
from hetlm.deploy import FORMATS, deploy
from hetlm.gguf_export import GGUF_DTYPES
from hetlm.model import DTYPES

TargetArgument = Annotated[Path, typer.Argument(help="A run folder, a checkpoint folder or a bundle.", show_default=False)]


@app.command("deploy", epilog=examples(
    "hetlm deploy runs/tiny --out bundles/tiny",
    "hetlm deploy runs/tiny --out bundles/tiny-gguf --format gguf --dtype q8_0",
    "hetlm deploy runs/tiny --out bundles/tiny-latest --latest --dtype bf16",
))
def deploy_command(
    target: TargetArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle folder to write.", show_default=False)],
    dtype: Annotated[str, typer.Option(
        "--dtype", help=f"Weights dtype: {', '.join(DTYPES)}; with --format gguf also "
                        f"{', '.join(d for d in GGUF_DTYPES if d not in DTYPES)}.")] = "fp32",
    output_format: Annotated[str, typer.Option(
        "--format", help=f"What to write: {', '.join(FORMATS)}. hf: safetensors and the Hugging Face files, which "
                         "hetlm and transformers load; gguf: model.gguf and an Ollama Modelfile, for llama.cpp and "
                         "Ollama; all: both.")] = "hf",
    latest: Annotated[bool, typer.Option("--latest", help="Take a run's newest checkpoint instead of its best.")] = False,
) -> None:
    """Write a self-contained bundle for hetlm and Hugging Face transformers, or llama.cpp and Ollama (--format)."""
    with RichReporter() as reporter:
        path = deploy(target, out, dtype=dtype, prefer="latest" if latest else "best", output_format=output_format,
                      reporter=reporter)
        reporter.info(f"bundle written to {path} ({output_format}, {dtype})")
    stdout.print(str(path), highlight=False, markup=False)
