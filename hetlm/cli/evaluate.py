"""``hetlm eval`` (also ``hetlm evaluate``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from hetlm.cli.app import app, examples
from hetlm.cli.loading import TargetArgument, load_for_inference
from hetlm.cli.options import SetOption, key_help
from hetlm.cli.render import RichReporter, stderr, stdout, weights_line
from hetlm.errors import HetlmError, UsageError
from hetlm.evaluate import evaluate, text_tokens
from hetlm.store import open_mask, open_split, read_data_manifest
from hetlm.tokenizer import Tokenizer

# The model's shape and tokenizer come with the weights; only these sections may be overridden.
OVERRIDABLE = ("device", "eval", "sample")


def evaluate_command(
    target: TargetArgument,
    more_text: Annotated[Optional[list[Path]], typer.Argument(
        metavar="text_file", help="More text files for --text: --text A B is --text A --text B.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Data folder to score \\[default: the model's data.dir].", show_default=False)] = None,
    text: Annotated[Optional[list[Path]], typer.Option(
        "--text", help="Score these text files instead, tokenized with the model's tokenizer, each as <s> text </s> "
        "(--text A B or --text A --text B).", metavar="<path>", show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the data folder: val or train.")] = "val",
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", help=key_help("eval.max_tokens"), show_default=False)] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", help=key_help("eval.stride"), show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")] = False,
    set_: SetOption = None,
) -> None:
    """Loss, perplexity and bits per byte of a model on a data split or text files, every token scored once (of a chat
    folder, every token of the assistant replies)."""
    if more_text and not text:
        raise UsageError(f"unexpected argument {more_text[0]} (text files go after --text)")
    files = [*(text or []), *(more_text or [])]
    if files and data is not None:
        raise UsageError("--data and --text exclude each other: score a data folder or text files")
    if split not in ("val", "train"):
        raise UsageError(f"--split must be val or train, got {split!r}")
    loaded, config, plan = load_for_inference(target, set_, OVERRIDABLE, "eval")
    max_tokens = config.eval.max_tokens if max_tokens is None else max_tokens
    stride = config.eval.stride if stride is None else stride
    if max_tokens < 0 or stride < 0:
        raise UsageError("--max-tokens and --stride must be >= 0")
    tokenizer = Tokenizer.load(loaded.tokenizer_path)
    chars = None
    learned = None
    if files:
        tokens, _, chars = text_tokens(tokenizer, files)
        source, inputs = "text", [str(f) for f in files]
    else:
        folder = Path(data if data is not None else config.data.dir)
        manifest = read_data_manifest(folder)
        made_with = manifest.get("tokenizer", {}).get("sha256")
        if made_with != tokenizer.sha256:
            raise UsageError(f"data folder {folder} was made with another tokenizer than the model {loaded.path}: "
                             "evaluate on the data the model was trained with, or use --text")
        tokens = open_split(folder, split, manifest)
        learned = open_mask(folder, split, manifest)
        source, inputs = split, [str(folder)]
    with RichReporter() as reporter:
        result = evaluate(loaded.model, tokenizer, tokens, source=source, inputs=inputs, checkpoint=str(loaded.path),
                          stride=stride, max_tokens=max_tokens, batch_size=config.eval.batch_size, plan=plan,
                          chars=chars, reporter=reporter, learned=learned)
    stderr.print(weights_line(plan, plan.weights_in_use(loaded.model)), highlight=False, markup=False, soft_wrap=True)
    record = result.to_dict()
    # The score first: a run folder that cannot be written to must not cost the result.
    if json_:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    else:
        stdout.print(_table(record))
    with RichReporter() as reporter:
        try:
            saved = loaded.save_eval_results(record, reporter)
        except (OSError, HetlmError) as exc:
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            reporter.warning(f"the result was not saved to {escape(str(loaded.eval_results_path))}: {escape(reason)}")
            return
    if saved is not None:
        stderr.print(f"saved {escape(str(saved))}", highlight=False)


def _table(record: dict) -> Table:
    what = "text files" if record["source"] == "text" else f"{record['source']} split"
    table = Table(title=f"Evaluation on {what}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")
    table.add_row("loss", f"{record['loss']:.4f}", "mean negative log-likelihood per token (nats)")
    table.add_row("perplexity", f"{record['perplexity']:.3f}", "exp(loss)")
    table.add_row("bits per byte", f"{record['bits_per_byte']:.4f}", "total NLL in bits / UTF-8 bytes of the text")
    if record["bits_per_char"] is not None:
        table.add_row("bits per char", f"{record['bits_per_char']:.4f}", "total NLL in bits / characters of the text")
    per_token = record["bytes"] / record["tokens"]
    table.add_row("tokens", f"{record['tokens']:,}", f"{record['bytes']:,} bytes, {per_token:.2f} per token")
    table.add_row("windows", f"{record['windows']:,}", f"context {record['context_length']}, stride {record['stride']}")
    table.add_row("speed", f"{record['tokens_per_second']:,.0f} tok/s",
                  f"{record['seconds']:.2f} s on {record['device']} ({record['dtype']})")
    return table


EXAMPLES = examples(
    "hetlm eval runs/tiny",
    "hetlm eval runs/tiny --split train --max-tokens 20000 --json",
    "hetlm eval bundles/tiny --text README.md",
)
app.command("eval", epilog=EXAMPLES)(evaluate_command)
app.command("evaluate", help="Same as hetlm eval.", epilog=EXAMPLES)(evaluate_command)


