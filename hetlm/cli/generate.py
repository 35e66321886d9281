"""``hetlm generate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetlm.cli.app import app, examples
from hetlm.cli.evaluate import OVERRIDABLE
from hetlm.cli.loading import TargetArgument, load_for_inference
from hetlm.cli.options import (
    MaxNewTokensOption,
    QuantizeOption,
    SeedOption,
    SetOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
)
from hetlm.cli.render import RichReporter, stderr, weights_line
from hetlm.errors import UsageError
from hetlm.sampling import Sampler, encode_prompt, make_generator
from hetlm.sampling_settings import SamplingSettings
from hetlm.tokenizer import Tokenizer


@app.command("generate", epilog=examples(
    'hetlm generate runs/tiny --prompt "def main(" --max-new-tokens 80 --seed 0',
    "hetlm generate bundles/tiny --prompt-file hetlm/__main__.py --temperature 0 --max-new-tokens 40",
    'hetlm generate runs/tiny --prompt "import " --num-samples 3 --top-p 0.9 --stop "def "',
))
def generate_command(
    target: TargetArgument,
    stdin: Annotated[Optional[str], typer.Argument(
        metavar="-", help="Read the prompt from standard input (instead of --prompt or --prompt-file).",
        show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt text.", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", help="Read the prompt from this UTF-8 file.", show_default=False)] = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    seed: SeedOption = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", help="End the text before this string (repeatable).", metavar="<text>", show_default=False)] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples drawn as one batch.")] = 1,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the text when it is complete.")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also show where the model's parts sit and the memory they hold beside the plan's.")] = False,
    quantize: QuantizeOption = None,
    set_: SetOption = None,
) -> None:
    """Continue a prompt: text streams to stdout as it is generated, statistics go to stderr.

    The prompt starts with <s>; generation ends at </s>, a stop string or --max-new-tokens.

    Past the context length the window slides: the newest half of the context is kept and prefilled again.

    With --num-samples above 1 each sample is printed whole, after a '=== sample i/N ===' line.
    """
    text = _prompt_text(stdin, prompt, prompt_file)
    quantized = [f"sample.quantize={quantize}"] if quantize is not None else []
    loaded, config, plan = load_for_inference(target, [*(set_ or []), *quantized], OVERRIDABLE, "generate")
    settings = SamplingSettings.from_config(
        config.sample, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop=tuple(stop) if stop else None, num_samples=num_samples,
    )
    tokenizer = Tokenizer.load(loaded.tokenizer_path)
    sampler = Sampler(loaded.model, tokenizer, plan)
    if verbose:
        placed = "; ".join(f"{s.device} {s.describe()}" for s in plan.placements)
        stderr.print(f"placement: {placed}", highlight=False, markup=False, soft_wrap=True)
        stderr.print(weights_line(plan, plan.weights_in_use(loaded.model, sampler.decoder)), highlight=False, markup=False,
                     soft_wrap=True)
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
