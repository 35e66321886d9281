"""The hetlm command line: parse, build the config, call library code, render its reports."""

# Each stage registers its commands on ``app`` when imported.
from hetlm.cli import config_cmd, deploy, evaluate, plan, preprocess, train  # noqa: F401
from hetlm.cli.app import app, main, run

__all__ = ["app", "main", "run"]
