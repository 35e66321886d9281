"""``hetlm preprocess``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from hetlm.build import tokenizer_source
from hetlm.cli.app import app, examples
from hetlm.cli.options import ConfigOption, SetOption, key_help
from hetlm.cli.render import RichReporter, stderr, stdout
from hetlm.config import load_config
from hetlm.planner import detect_inventory, make_plan
from hetlm.preprocess import BUILTIN_CORPUS, preprocess
from hetlm.tokenizer import Tokenizer


@app.command("preprocess", epilog=examples(
    "hetlm preprocess",
    "hetlm preprocess hetlm/ README.md --include '*.py' --include '*.md' --vocab-size 2048 --out data/hetlm-src",
    "hetlm preprocess hetlm/ --include '*.py' --tokenizer-from runs/tiny --out data/hetlm-src-tiny",
))
def preprocess_cmd(
    inputs: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Files, folders (recursive) and glob patterns: plain text of any extension, .jsonl, .html (as its "
            "text), and .gz of each; with --chat, JSON Lines of conversations. None: the built-in corpus "
            f"{BUILTIN_CORPUS} (this Python's standard library source and docs).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Output folder \\[default: data.dir when the config sets it, else data/<name of the "
                     "first input>].", show_default=False),
    ] = None,
    vocab_size: Annotated[
        Optional[int],
        typer.Option("--vocab-size", help=key_help("data.vocab_size"), show_default=False),
    ] = None,
    tokenizer: Annotated[
        Optional[str], typer.Option("--tokenizer", help=key_help("data.tokenizer"), show_default=False)
    ] = None,
    val_fraction: Annotated[
        Optional[float],
        typer.Option("--val-fraction", help=key_help("data.val_fraction"), show_default=False),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option("--workers", "-j", help=key_help("data.workers"), show_default=False),
    ] = None,
    text_field: Annotated[
        Optional[str], typer.Option("--text-field", help=key_help("data.text_field"), show_default=False)
    ] = None,
    tokenizer_from: Annotated[
        Optional[Path],
        typer.Option("--tokenizer-from", help="Encode with the tokenizer of this run, checkpoint, bundle, data folder or "
                     "Hugging Face Llama folder instead of training one (to fine-tune that model).", show_default=False),
    ] = None,
    include: Annotated[
        Optional[list[str]],
        typer.Option("--include", help="Only take files whose name or path matches this glob (repeatable), e.g. '*.md'.",
                     metavar="<glob>", show_default=False),
    ] = None,
    exclude: Annotated[
        Optional[list[str]],
        typer.Option("--exclude", help="Leave out files whose name or path matches this glob (repeatable), e.g. "
                     "'*/tests/*'.", metavar="<glob>", show_default=False),
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help=key_help("data.chat"), show_default=False)] = False,
    html: Annotated[Optional[str], typer.Option("--html", help=key_help("data.html"), show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Redo the work even if the folder is up to date.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Train a lossless tokenizer on your text and write the train/val token streams.

    Writes DIR/tokenizer.model, train.bin, val.bin (with --chat also train.mask.bin and val.mask.bin, which
    mark the assistant replies training learns), config.yaml and manifest.json, and prints DIR on stdout.
    """
    resolved = load_config(config, set_ or [])
    data = resolved.data
    for key, value in (("vocab_size", vocab_size), ("tokenizer", tokenizer), ("val_fraction", val_fraction),
                       ("workers", workers), ("text_field", text_field), ("html", html)):
        if value is not None:
            setattr(data, key, value)
    if chat:
        data.chat = True
    data.validate()
    given = Tokenizer.load(tokenizer_source(tokenizer_from)) if tokenizer_from is not None else None
    with RichReporter(stderr) as reporter:
        plan = make_plan(detect_inventory(), resolved, workload="preprocess")
        result = preprocess(resolved, inputs or [], out, workers=plan.preprocess_workers,
                            force=force, reporter=reporter, tokenizer=given, include=include or (),
                            exclude=exclude or ())
    stderr.print(summary_table(result.manifest))
    if line := characters_line(result.manifest):
        stderr.print(line, highlight=False, markup=False)
    if line := learned_line(result.manifest):
        stderr.print(line, highlight=False, markup=False)
    if skipped := result.manifest.get("skipped"):
        stderr.print("skipped: " + escape(", ".join(f"{n} {reason}" for reason, n in skipped.items())), highlight=False)
    if not result.up_to_date:
        timings = result.manifest.get("timings", {})
        stderr.print(f"wrote {escape(str(result.out))} in {timings.get('total_s', 0):.1f} s "
                     f"(read {timings.get('read_s', 0):.1f} s, tokenizer {timings.get('tokenizer_s', 0):.1f} s, "
                     f"encode {timings.get('encode_s', 0):.1f} s)", highlight=False)
    stdout.print(escape(str(result.out)), highlight=False)


def summary_table(manifest: dict[str, Any]) -> Table:
    tok = manifest["tokenizer"]
    table = Table(title=f"{manifest.get('corpus', '')}: {tok['type']} tokenizer, vocabulary {tok['vocab_size']:,}, "
                        f"{manifest['split']['method']} split", title_justify="left")
    for column in ("split", "documents", "bytes", "tokens", "bytes/token"):
        table.add_column(column, justify="left" if column == "split" else "right")
    totals = {"documents": 0, "bytes": 0, "tokens": 0}
    rows = list(manifest["splits"].items())
    for _, entry in rows:
        for key in totals:
            totals[key] += entry[key]
    for name, entry in [*rows, ("total", totals)]:
        ratio = entry["bytes"] / entry["tokens"] if entry["tokens"] else 0.0
        table.add_row(name, f"{entry['documents']:,}", f"{entry['bytes']:,}", f"{entry['tokens']:,}", f"{ratio:.2f}")
    return table


def learned_line(manifest: dict[str, Any]) -> str | None:
    """For chat data, how much of each split training learns (the assistant replies)."""
    if not manifest.get("chat"):
        return None
    return "learned (assistant replies): " + ", ".join(
        f"{name} {entry['learned_tokens']:,} of {entry['tokens']:,} tokens" for name, entry in manifest["splits"].items())


def characters_line(manifest: dict[str, Any]) -> str | None:
    """How the tokenizer's sample's characters came out; None for a folder made before this was recorded."""
    chars = manifest["tokenizer"].get("characters")
    if not chars:
        return None
    return (f"characters in the tokenizer's sample: {chars['own_pieces']:,} of {chars['distinct']:,} have their own "
            f"pieces, {chars['byte_fallback']:,} fall back to bytes ({chars['byte_fallback_share']:.2%} of the "
            "sample's characters)")
