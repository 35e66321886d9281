"""``hetlm eval`` (also ``hetlm evaluate``) and ``hetlm generate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from hetlm.checkpoint import LoadedModel, load_checkpoint
from hetlm.cli.app import app
from hetlm.cli.options import SetOption
from hetlm.cli.render import RichReporter, stderr, stdout
from hetlm.config import with_overrides
from hetlm.errors import UsageError
from hetlm.io import atomic_write_json

TargetArgument = Annotated[Path, typer.Argument(help="A run folder (its best checkpoint), a checkpoint folder or a bundle.",
                                                show_default=False)]
# The model's shape and tokenizer come with the weights; only these sections may be overridden.
OVERRIDABLE = ("device", "eval", "sample")


def _load(target: Path, assignments: list[str] | None):
    from hetlm.planner import detect_inventory, make_plan

    with RichReporter() as reporter:
        loaded = load_checkpoint(target, "cpu", reporter=reporter)
    config = with_overrides(loaded.config, assignments or [], OVERRIDABLE)
    plan = make_plan(detect_inventory(), config, workload="infer")
    plan.apply()
    loaded.model.to(plan.torch_device)
    return loaded, config, plan


def results_path(loaded: LoadedModel) -> Path | None:
    """Where eval.json goes: the checkpoint's run folder, else the checkpoint folder; None for a bundle."""
    if (loaded.manifest or {}).get("kind") == "bundle":
        return None
    path = Path(loaded.path)
    if path.parent.name == "checkpoints":
        return path.parent.parent / "eval.json"
    return path / "eval.json"


def evaluate_command(
    target: TargetArgument,
    more_text: Annotated[Optional[list[Path]], typer.Argument(hidden=True, metavar="FILE", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Data folder to score \\[default: the model's data.dir].", show_default=False)] = None,
    text: Annotated[Optional[list[Path]], typer.Option(
        "--text", help="Score these text files instead, tokenized with the model's tokenizer, each as <s> text </s> "
        "(--text A B or --text A --text B).", show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the data folder: val or train.")] = "val",
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", help="Score only the first N tokens \\[default: eval.max_tokens; 0 = all].", show_default=False)] = None,
    stride: Annotated[Optional[int], typer.Option(
        "--stride", help="Start a window every S tokens and score only its new tokens \\[default: eval.stride; "
        "0 = the context length, non-overlapping].", show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")] = False,
    set_: SetOption = None,
) -> None:
    """Loss, perplexity and bits per byte of a model on a data split or text files, every token scored once."""
    from hetlm.evaluate import evaluate, text_tokens
    from hetlm.preprocess import load_data_manifest, open_split
    from hetlm.tokenizer import Tokenizer

    if more_text and not text:
        raise UsageError(f"unexpected argument {more_text[0]} (text files go after --text)")
    files = [*(text or []), *(more_text or [])]
    if files and data is not None:
        raise UsageError("--data and --text exclude each other: score a data folder or text files")
    if split not in ("val", "train"):
        raise UsageError(f"--split must be val or train, got {split!r}")
    loaded, config, plan = _load(target, set_)
    max_tokens = config.eval.max_tokens if max_tokens is None else max_tokens
    stride = config.eval.stride if stride is None else stride
    if max_tokens < 0 or stride < 0:
        raise UsageError("--max-tokens and --stride must be >= 0")
    tokenizer = Tokenizer.load(loaded.tokenizer_path)
    chars = None
    if files:
        tokens, _, chars = text_tokens(tokenizer, files)
        source, inputs = "text", [str(f) for f in files]
    else:
        folder = Path(data if data is not None else config.data.dir)
        manifest = load_data_manifest(folder)
        made_with = manifest.get("tokenizer", {}).get("sha256")
        if made_with != tokenizer.sha256:
            raise UsageError(f"data folder {folder} was made with another tokenizer than the model {loaded.path}: "
                             "evaluate on the data the model was trained with, or use --text")
        tokens = open_split(folder, split)
        source, inputs = split, [str(folder)]
    with RichReporter() as reporter:
        result = evaluate(loaded.model, tokenizer, tokens, source=source, inputs=inputs, checkpoint=str(loaded.path),
                          stride=stride, max_tokens=max_tokens, batch_size=config.eval.batch_size, plan=plan,
                          chars=chars, reporter=reporter)
    record = result.to_dict()
    saved = results_path(loaded)
    if saved is not None:
        atomic_write_json(saved, record)
    if json_:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    else:
        stdout.print(_table(record))
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


app.command("eval")(evaluate_command)
app.command("evaluate", help="Same as `hetlm eval`.")(evaluate_command)


@app.command("generate")
def generate_command(
    target: TargetArgument,
    stdin: Annotated[Optional[str], typer.Argument(
        metavar="[-]", help="'-' reads the prompt from standard input.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt text.", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", help="Read the prompt from this UTF-8 file.", show_default=False)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", "-n", help="\\[default: sample.max_new_tokens]", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option(
        "--temperature", "-t", help="0 = greedy \\[default: sample.temperature]", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Sample among the K likeliest tokens; 0 = off \\[default: sample.top_k]", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option(
        "--top-p", help="Sample among the likeliest tokens holding P of the probability \\[default: sample.top_p]",
        show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Same seed, same text \\[default: sample.seed]", show_default=False)] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", help="End the text before this string (repeatable).", show_default=False)] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples drawn as one batch.")] = 1,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the text when it is complete.")] = False,
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", help="int8: decode with int8 weights, faster for larger models on the CPU; none: full precision "
        "\\[default: sample.quantize]", show_default=False)] = None,
    set_: SetOption = None,
) -> None:
    """Continue a prompt: text streams to stdout as it is generated, statistics go to stderr.

    The prompt starts with <s>; generation ends at </s>, a stop string or --max-new-tokens.

    Past the context length the window slides: the newest half of the context is kept and prefilled again.

    With --num-samples above 1 each sample is printed whole, after a '=== sample i/N ===' line.
    """
    from hetlm.sampling import Sampler, SamplingSettings, encode_prompt, make_generator
    from hetlm.tokenizer import Tokenizer

    text = _prompt_text(stdin, prompt, prompt_file)
    loaded, config, plan = _load(target, [*(set_ or []), *([f"sample.quantize={quantize}"] if quantize is not None else [])])
    settings = SamplingSettings.from_config(
        config.sample, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop=tuple(stop) if stop else None, num_samples=num_samples,
    )
    tokenizer = Tokenizer.load(loaded.tokenizer_path)
    sampler = Sampler(loaded.model, tokenizer, plan)
    generator = make_generator(config.sample.seed if seed is None else seed, plan.torch_device)
    with RichReporter() as reporter:
        generation = sampler.stream(encode_prompt(tokenizer, text), settings, generator, reporter)
        out = sys.stdout
        if num_samples == 1 and not no_stream:
            for chunk in generation:
                if chunk.text:
                    out.write(chunk.text)
                    out.flush()
            out.write("\n")
        else:
            for _ in generation:
                pass
            for completion in generation.result.completions:
                if num_samples > 1:
                    out.write(f"=== sample {completion.index + 1}/{num_samples} ===\n")
                out.write(completion.text + "\n")
        out.flush()
    result = generation.result
    reasons = ", ".join(sorted(set(c.finish_reason for c in result.completions)))
    slid = f", window slid {result.slides}x" if result.slides else ""
    stderr.print(
        f"{result.new_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_second:,.1f} tok/s), "
        f"time to first token {result.time_to_first_token * 1000:.0f} ms, prompt {result.prompt_tokens} tokens, "
        f"ended by {reasons}{slid} [{plan.device}{', int8 weights' if plan.decode_weights == 'int8' else ''}]",
        highlight=False, markup=False, soft_wrap=True,
    )


def _prompt_text(stdin: str | None, prompt: str | None, prompt_file: Path | None) -> str:
    if stdin is not None and stdin != "-":
        raise UsageError(f"unexpected argument {stdin!r}: give the prompt with --prompt, --prompt-file or '-' for stdin")
    given = [name for name, value in (("--prompt", prompt), ("--prompt-file", prompt_file), ("-", stdin)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"give the prompt one way only, not {' and '.join(given)}")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UsageError(f"prompt file not found: {prompt_file}")
        try:
            return prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{prompt_file} is not UTF-8 text") from None
    if stdin == "-":
        return sys.stdin.read()
    return prompt or ""
