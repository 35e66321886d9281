"""The hetlm command line: parse, build the config, call library code, render its reports."""

# Each stage registers its commands on ``app`` when imported, and help lists them in that order: the pipeline's.
from hetlm.cli import preprocess, plan, build, train, evaluate, generate, deploy, serve, config  # noqa: F401, I001
from hetlm.cli.app import app, main, run

__all__ = ["app", "main", "run"]
