"""Rich rendering of library reports: progress bars, warnings and tables, all on stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hetlm.planner import Plan
from hetlm.reporting import Reporter

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True)


class RichReporter(Reporter):
    """Shows each started task as a progress bar; byte tasks show MB/s."""

    def __init__(self, console: Console = stderr) -> None:
        self.console = console
        self.progress = Progress(*self.columns(), console=console, transient=False, disable=not console.is_terminal)
        self.tasks: dict[str, Any] = {}

    def columns(self) -> tuple[Any, ...]:
        return (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TransferSpeedColumn(), TimeElapsedColumn())

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, task: str, total: float | None = None, unit: str = "") -> None:
        self.tasks[task] = self.progress.add_task(task, total=total)

    def advance(self, task: str, amount: float = 1.0) -> None:
        if task in self.tasks:
            self.progress.advance(self.tasks[task], amount)

    def finish(self, task: str) -> None:
        if task in self.tasks:
            handle = self.tasks.pop(task)
            total = self.progress.tasks[handle].total
            if total is None:
                self.progress.update(handle, total=self.progress.tasks[handle].completed)
            else:
                self.progress.update(handle, completed=total)

    def info(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)

    def warning(self, message: str) -> None:
        self.progress.console.print(f"[yellow]warning:[/] {message}", highlight=False)


def plan_table(plan: Plan) -> Table:
    """The planner's decisions, one row each, the memory row green when the plan fits and red when not."""
    table = Table(title=f"Plan: {plan.workload} on {plan.device} ({plan.dtype})", title_justify="left")
    table.add_column("Stage", style="bold")
    table.add_column("Choice", max_width=24)
    table.add_column("Why")
    for decision in plan.decisions:
        choice = escape(decision.choice)
        if decision.stage == "memory":
            choice = f"[green]{choice}[/]" if plan.fits else f"[bold red]{choice}[/]"
        table.add_row(escape(decision.stage), choice, escape(decision.reason))
    return table


def size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return "0" if n == 0 else f"{n / 2**10:.1f} KiB"


def weights_line(plan: Plan, used: dict[str, int]) -> str:
    """Weights held per device beside what the plan predicted for them."""
    predicted = {m.device: m.weights for m in plan.memory}
    return "weights in memory: " + ", ".join(
        f"{device} {size(n)} (planned {size(predicted.get(device, 0))})" for device, n in used.items())
