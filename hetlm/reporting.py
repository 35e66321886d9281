"""Progress reporting: library code calls a Reporter, the CLI decides how it looks.

Library functions never print. They take a ``reporter`` argument and call its methods;
``NullReporter`` ignores everything, the CLI passes a Rich renderer.
"""

from __future__ import annotations

from typing import Any


class Reporter:
    """Base reporter: every method is a no-op, so subclasses override only what they show."""

    def start(self, task: str, total: float | None = None, unit: str = "") -> None:
        """A task with an optional known total begins (e.g. "encode", total bytes)."""

    def advance(self, task: str, amount: float = 1.0) -> None:
        """Progress on a started task."""

    def finish(self, task: str) -> None:
        """A task is done."""

    def info(self, message: str) -> None:
        """A diagnostic line for the user."""

    def warning(self, message: str) -> None:
        """Something the user should know, that does not stop the work."""

    def metrics(self, kind: str, values: dict[str, Any]) -> None:
        """Structured figures (e.g. kind="train" with step, loss, lr, tok/s)."""


NullReporter = Reporter
