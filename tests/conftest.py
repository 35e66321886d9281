"""Shared fixtures: run the CLI in-process and capture what it prints."""

from __future__ import annotations

import pytest
import torch

from hetlm.cli import run


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test models run fastest on one thread; more threads only fight over the cores."""
    torch.set_num_threads(1)


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Call ``cli("preprocess", "x")`` and get the exit code, stdout and stderr."""

    def invoke(*args: str) -> CliResult:
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke
