"""The hetlm command line: parse, build the config, call library code, render its reports."""

# Before anything imports torch: its OpenMP pool reads the wait policy once, when it starts.
from hetlm.openmp import set_wait_policy

set_wait_policy()

# Each stage registers its commands on ``app`` when imported, and help lists them in that order: the pipeline's.
from hetlm.cli import preprocess, plan, build, train, evaluate, generate, chat, deploy, serve, config  # noqa: E402, F401, I001
from hetlm.cli.app import app, main, run  # noqa: E402

__all__ = ["app", "main", "run"]
