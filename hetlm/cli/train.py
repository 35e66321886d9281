"""``hetlm build`` and ``hetlm train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hetlm.build import build_run, open_data_folder, resolve_config
from hetlm.cli.app import app
from hetlm.cli.options import ConfigOption, SetOption
from hetlm.cli.render import RichReporter, stderr, stdout
from hetlm.config import Config, load_config
from hetlm.planner import Plan, detect_inventory, make_plan
from hetlm.reporting import Reporter
from hetlm.train import TrainResult, process_layout, train

OutOption = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Run folder (default: runs/<config name>).", show_default=False),
]


def _plan_for(config: Config) -> tuple[Config, Plan]:
    resolved = resolve_config(config, open_data_folder(config))
    _, world_size, local_rank = process_layout()
    return resolved, make_plan(detect_inventory(), resolved, "train", world_size=world_size, local_rank=local_rank)


def _plan_table(plan: Plan) -> Table:
    table = Table(title=f"Plan: train on {plan.device} ({plan.dtype})", title_justify="left")
    table.add_column("Stage", style="bold")
    table.add_column("Choice")
    table.add_column("Why", style="dim")
    for decision in plan.decisions:
        choice = escape(decision.choice)
        if decision.stage == "memory" and not plan.fits:
            choice = f"[bold red]{choice}[/]"
        table.add_row(escape(decision.stage), choice, escape(decision.reason))
    return table


@app.command("build")
def build(config: ConfigOption = None, set_: SetOption = None, out: OutOption = None) -> None:
    """Build the model against the data folder's tokenizer and write the run folder with its step-0 checkpoint."""
    resolved, plan = _plan_for(load_config(config, set_ or []))
    with RichReporter() as reporter:
        result = build_run(resolved, out, reporter)
    sizes = Table(title=f"Model {resolved.name}", title_justify="left", show_header=False)
    sizes.add_column(style="bold")
    sizes.add_column(justify="right")
    m = resolved.model
    sizes.add_row("parameters", f"{result.params['total']:,}")
    sizes.add_row("  embedding", f"{result.params['embedding']:,}")
    sizes.add_row("  non-embedding", f"{result.params['non_embedding']:,}")
    sizes.add_row("FLOPs per token", f"{result.flops_per_token:,} (forward + backward, attention included)")
    sizes.add_row("shape", f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.kv_heads} kv), "
                           f"d_ff {m.ffn_dim}, context {m.context_length}, vocab {m.vocab_size}")
    stdout.print(sizes)
    stdout.print(_plan_table(plan))
    if not plan.fits:
        stdout.print("[bold red]the plan does not fit in memory; see the memory row above[/]")
    verb = "wrote" if result.created else "kept"
    stdout.print(f"{verb} run {escape(str(result.run_dir))}: config.yaml and {escape(str(result.checkpoint))}", highlight=False)


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


class TrainReporter(Reporter):
    """A live progress line on a terminal; one line per log interval otherwise."""

    def __init__(self, console: Console = stderr) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), console=console, disable=not self.live,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> TrainReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, task: str, total: float | None = None, unit: str = "") -> None:
        self.tasks[task] = self.progress.add_task(task, total=total, status="")

    def advance(self, task: str, amount: float = 1.0) -> None:
        if task in self.tasks:
            self.progress.advance(self.tasks[task], amount)

    def finish(self, task: str) -> None:
        self.tasks.pop(task, None)

    def info(self, message: str) -> None:
        self.progress.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def warning(self, message: str) -> None:
        self.progress.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    def metrics(self, kind: str, values: dict[str, Any]) -> None:
        if kind == "train":
            line = train_line(values)
            if self.live and "train" in self.tasks:
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


@app.command("train")
def train_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    out: OutOption = None,
    resume: Annotated[
        str, typer.Option("--resume", help="auto (newest complete checkpoint), never (start over), or a checkpoint/run PATH.")
    ] = "auto",
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Train up to this step (train.max_steps).")] = None,
    max_time: Annotated[
        Optional[str], typer.Option("--max-time", help="Stop after this wall time, e.g. 90s, 10m (train.max_time).")
    ] = None,
) -> int:
    """Train the run's model; continues from its newest checkpoint. Works under torchrun for DDP."""
    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if max_time is not None:
        overrides.append(f"train.max_time={max_time}")
    resolved, plan = _plan_for(load_config(config, overrides))
    with TrainReporter() as reporter:
        result = train(resolved, plan, out, resume, reporter)
    if result.rank != 0:
        return result.exit_code
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        stderr.print(f"[yellow]stopped by {result.stopped_by}[/] at step {result.step}; resume with the same command",
                     highlight=False)
    stdout.print(_summary(result))
    return result.exit_code
