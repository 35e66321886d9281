"""The Typer application, global options and the error policy shared by every command."""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from hetlm import __version__
from hetlm.cli.render import stderr
from hetlm.errors import HetlmError


def _switches_take_no_value(params: list) -> list:
    # Typer shows every option's type, so a flag reads as "--json <bool>" as if it wanted a value.
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A command whose help shows flags as bare switches and arguments as TARGET / [NAME]... in the usage line."""

    def get_params(self, ctx):
        return _switches_take_no_value(super().get_params(ctx))

    def collect_usage_pieces(self, ctx):
        # Typer writes a required argument as {target}; the usual TARGET and [OPTIONAL]... read plainer.
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name).upper()
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
        return pieces


class Group(TyperGroup):
    """A command group whose help shows flags as bare switches."""

    def get_params(self, ctx):
        return _switches_take_no_value(super().get_params(ctx))


class Typer(typer.Typer):
    """typer.Typer whose commands are ``Command``s."""

    def command(self, *args, cls: type[TyperCommand] = Command, **kwargs):
        return super().command(*args, cls=cls, **kwargs)


def examples(*lines: str) -> str:
    """A command's epilog: example command lines, one per line (Rich keeps single newlines in an epilog)."""
    return "Examples:\n" + "\n".join(escape(line) for line in lines)


app = Typer(
    name="hetlm",
    cls=Group,
    help="Train, evaluate and deploy a small language model on the hardware you have.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hetlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full Python tracebacks on errors.")] = False,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Train, evaluate and deploy a small language model on the hardware you have."""
    _state["debug"] = debug


def _fail(message: str, code: int) -> int:
    # Messages quote paths and library errors, whose brackets are not Rich markup.
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code


def _is_click_error(exc: Exception) -> bool:
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def _traceback() -> None:
    if _state["debug"]:
        traceback.print_exc()


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code instead of exiting.

    With --debug the traceback comes first; the error line and the exit code stay the same.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in args
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="hetlm", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except HetlmError as exc:
        _traceback()
        return _fail(str(exc), exc.exit_code)
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _traceback()
        stderr.print("[yellow]interrupted[/]")
        return 130
    except Exception as exc:
        if _is_click_error(exc):
            # Typer's own copy of click raises these for bad options; they already carry exit code 2.
            message = exc.format_message()
            if not message:
                # `hetlm` alone: the help is already printed and says it all.
                return exc.exit_code
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                stderr.print(ctx.get_usage(), highlight=False)
            return _fail(message, exc.exit_code)
        _traceback()
        return _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


def main() -> None:
    sys.exit(run())
