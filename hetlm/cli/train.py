"""``hetlm train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hetlm.build import default_run_dir, init_config, open_init
from hetlm.cli.app import app, examples
from hetlm.cli.build import plan_for
from hetlm.cli.options import ConfigOption, OutOption, SetOption, key_help
from hetlm.cli.render import RichReporter, stderr, stdout
from hetlm.config import load_config
from hetlm.errors import UsageError
from hetlm.store import DataFolder, RunDir
from hetlm.train import TrainResult, train


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_line(values: dict[str, Any]) -> str:
    loss = values.get("loss")
    parts = [f"step {values['step']}", f"loss {loss:.4f}" if loss is not None else "loss n/a", f"lr {values['lr']:.2e}",
             f"{values['tok_per_s']:,.0f} tok/s"]
    if "mfu" in values:
        parts.append(f"MFU {values['mfu']:.1%}")
    parts.append(f"ETA {_eta(values['eta_s'])}")
    if values.get("bad_steps"):
        parts.append(f"{values['bad_steps']} skipped")
    return "  ".join(parts)


def eval_line(values: dict[str, Any]) -> str:
    line = f"step {values['step']}: val loss {values['val_loss']:.4f}  ppl {values['val_ppl']:.2f}"
    if "val_bpb" in values:
        line += f"  {values['val_bpb']:.3f} bits/byte"
    return line


class TrainReporter(RichReporter):
    """A live progress line on a terminal; one line per log interval otherwise."""

    def columns(self) -> tuple[Any, ...]:
        return (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn())

    def start(self, task: str, total: float | None = None, unit: str = "") -> None:
        self.tasks[task] = self.progress.add_task(task, total=total, status="")

    def finish(self, task: str) -> None:
        self.tasks.pop(task, None)

    def info(self, message: str) -> None:
        self.progress.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def warning(self, message: str) -> None:
        self.progress.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    def metrics(self, kind: str, values: dict[str, Any]) -> None:
        if kind == "train":
            line = train_line(values)
            if self.console.is_terminal and "train" in self.tasks:
                self.progress.update(self.tasks["train"], status=escape(line))
            else:
                self.progress.console.print(line, highlight=False, markup=False, soft_wrap=True)
        elif kind == "eval":
            self.progress.console.print(eval_line(values), highlight=False, markup=False, soft_wrap=True)


def _summary(result: TrainResult) -> Table:
    table = Table(title=f"Training summary: {result.run_dir}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", f"{result.start_step} -> {result.step} of {result.max_steps} (stopped by {result.stopped_by})")
    table.add_row("tokens seen", f"{result.tokens:,}")
    table.add_row("time", f"{result.elapsed_s:.1f} s, {result.tokens_per_s:,.0f} tokens/s"
                  + (f" over {result.world_size} processes" if result.world_size > 1 else ""))
    if result.shares and result.rank_step_s:
        # Balanced shares keep every process busy for about the same time; the rest is waiting for the slowest.
        table.add_row("processes", ", ".join(
            f"rank {rank}: {share} sequences, busy {seconds * 1000:.0f} ms per step"
            for rank, (share, seconds) in enumerate(zip(result.shares, result.rank_step_s, strict=True))))
    if result.train_loss is not None:
        table.add_row("train loss", f"{result.train_loss:.4f}")
    if result.eval:
        table.add_row("val", eval_line(result.eval))
    if result.best_val_loss is not None:
        table.add_row("best val loss", f"{result.best_val_loss:.4f} at step {result.best_step}")
    if result.bad_steps:
        table.add_row("skipped steps", f"{result.bad_steps} (non-finite loss or gradients)")
    if result.checkpoint is not None:
        table.add_row("checkpoint", str(result.checkpoint))
    for name, path in result.outputs.items():
        table.add_row(name.replace("_", " "), str(path))
    return table


@app.command("train", epilog=examples(
    "hetlm train --config configs/tiny.yaml",
    "hetlm train runs/tiny --max-steps 600",
    "hetlm train --init runs/tiny --config configs/tiny.yaml --out runs/tiny-ft --max-steps 100",
))
def train_command(
    run: Annotated[
        Optional[Path], typer.Argument(help="Run folder to train or continue (the same as --out).", show_default=False)
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    out: OutOption = None,
    resume: Annotated[
        str, typer.Option("--resume", metavar="<auto|never|path>",
                            help="auto (newest complete checkpoint), never (start over), or a checkpoint or run PATH.")
    ] = "auto",
    max_steps: Annotated[
        Optional[int], typer.Option("--max-steps", help=key_help("train.max_steps"), show_default=False)
    ] = None,
    max_time: Annotated[Optional[str], typer.Option("--max-time", help=key_help("train.max_time"), show_default=False)] = None,
    init: Annotated[
        Optional[Path],
        typer.Option("--init", help="Start a new run from these weights (a hetlm run, checkpoint or bundle, or a Hugging "
                     "Face LlamaForCausalLM folder) with a fresh optimizer and schedule; the model comes from them.",
                     show_default=False),
    ] = None,
) -> int:
    """Train the run's model; continues from its newest checkpoint. Works under torchrun for DDP.

    On an existing run the saved config.yaml is the starting point: --config, --set, --max-steps and
    --max-time change only the keys they name.
    """
    if run is not None and out is not None and Path(run) != Path(out):
        raise UsageError(f"two run folders given ({run} and --out {out}): name it once")
    out = out if out is not None else run
    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if max_time is not None:
        overrides.append(f"train.max_time={max_time}")
    source = None
    if init is not None:
        if resume not in ("auto", "never"):
            raise UsageError("--init starts a new run from weights and --resume PATH continues one: give one of them")
        source = open_init(init)
        fresh = load_config(config, overrides)
        wanted = init_config(fresh, source, DataFolder.open(fresh.data.dir))
    else:
        # Where the run lives decides what the options apply to, so the default folder's name comes first.
        target = RunDir(out if out is not None else default_run_dir(load_config(config, overrides)))
        # A run whose checkpoints live elsewhere is refused before anything is read from them.
        target.check_layout()
        wanted = load_config(config, overrides, base=target.saved_config())
    resolved, plan = plan_for(wanted)
    with TrainReporter() as reporter:
        result = train(resolved, plan, out, resume, reporter, init=source)
    if result.rank != 0:
        return result.exit_code
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        stderr.print(f"[yellow]stopped by {result.stopped_by}[/] at step {result.step}; resume with the same command",
                     highlight=False)
    stdout.print(_summary(result))
    return result.exit_code
