"""``hetlm chat``."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from hetlm.chat import Conversation
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
from hetlm.cli.render import RichReporter, stderr
from hetlm.errors import HetlmError
from hetlm.sampling import Sampler, make_generator
from hetlm.sampling_settings import SamplingSettings
from hetlm.tokenizer import Tokenizer

PROMPT = "you> "
COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/system TEXT": "set the system message (/system alone removes it)",
    "/exit, /quit": "end the chat (so does Ctrl-D)",
    "/help": "list these commands",
}


@app.command("chat", epilog=examples(
    "hetlm chat runs/tiny",
    'hetlm chat bundles/tiny --system "You answer in one line." --temperature 0.7',
))
def chat_command(
    target: TargetArgument,
    system: Annotated[Optional[str], typer.Option(
        "--system", help="The system message the chat starts with.", show_default=False)] = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    seed: SeedOption = None,
    quantize: QuantizeOption = None,
    set_: SetOption = None,
) -> None:
    """Chat with a model in the terminal: each line you type is a message, and the reply streams back.

    Replies go to stdout, notes to stderr. Piped lines are messages too; then no prompt is printed, only the replies.

    The history uses hetlm serve's chat template; its oldest turns are dropped, with a note, to fit the context.

    The history leaves room for a reply of --max-new-tokens, or of half the context when that is less.

    Commands: /reset, /system TEXT, /help, /exit or /quit (or Ctrl-D).

    Ctrl-C during a reply stops it (what was shown stays in the history); Ctrl-C at the prompt ends the chat (exit 130).

    Example: hetlm chat runs/mine --system "You answer in one line." --temperature 0.7 --max-new-tokens 100
    """
    quantized = [f"sample.quantize={quantize}"] if quantize is not None else []
    loaded, config, plan = load_for_inference(target, [*(set_ or []), *quantized], OVERRIDABLE, "generate")
    settings = SamplingSettings.from_config(
        config.sample, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = Sampler(loaded.model, Tokenizer.load(loaded.tokenizer_path), plan)
    generator = make_generator(config.sample.seed if seed is None else seed, plan.torch_device)
    conversation = Conversation(sampler, settings, generator, system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (imported for its side effect: line editing and history in input())
        except ImportError:
            pass
    _note(f"chatting with {target} (context {sampler.context_length} tokens, replies up to {settings.max_new_tokens}); "
          f"/help lists the commands, /exit or Ctrl-D ends the chat")
    reporter = RichReporter()
    while True:
        try:
            line = input(PROMPT if interactive else "")
        except EOFError:
            if interactive:
                sys.stdout.write("\n")
            return
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            raise typer.Exit(130) from None
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(conversation, text):
                continue
            return
        _reply(conversation, text, reporter, interactive)


def _command(conversation: Conversation, text: str) -> bool:
    """Carry out a /command; False when it ends the chat."""
    name, _, argument = text.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        conversation.reset()
        _note("history cleared")
    elif name == "/system":
        conversation.system = argument.strip() or None
        _note(f"system message {'set' if conversation.system else 'removed'}")
    elif name == "/help":
        width = max(len(c) for c in COMMANDS)
        for command, what in COMMANDS.items():
            _note(f"{command:<{width}}  {what}")
    else:
        _note(f"unknown command {name}: /help lists the commands")
    return True


def _reply(conversation: Conversation, text: str, reporter: RichReporter, interactive: bool) -> None:
    out = sys.stdout
    reply = conversation.reply(text, reporter)
    stopped = False
    try:
        for piece in reply:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        reply.close()
        stopped = True
    except HetlmError as exc:
        # A message the model cannot take (not valid Unicode) ends that turn, not the chat.
        _note(f"error: {exc}")
        return
    out.write("\n")
    out.flush()
    if stopped:
        _note("reply stopped")
    if interactive:
        out.write("\n")


def _note(message: str) -> None:
    stderr.print(message, highlight=False, markup=False, soft_wrap=True)
