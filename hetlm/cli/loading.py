"""Loading a trained model for the commands that use one (eval, generate, serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hetlm.cli.render import RichReporter
from hetlm.config import Config, with_overrides
from hetlm.planner import Plan, detect_inventory, make_plan
from hetlm.store import LoadedModel, load_checkpoint

TargetArgument = Annotated[Path, typer.Argument(help="A run folder (its best checkpoint), a checkpoint folder or a bundle.",
                                                show_default=False)]


def load_for_inference(target: Path, assignments: list[str] | None, sections: tuple[str, ...],
                       workload: str) -> tuple[LoadedModel, Config, Plan]:
    """The model at ``target`` placed as the ``workload`` plan says, its config with ``--set`` applied to ``sections``.

    The model's shape and tokenizer come with the weights; only ``sections`` may be overridden. A plan that does not
    fit stops here, before the weights are placed.
    """
    with RichReporter() as reporter:
        loaded = load_checkpoint(target, "cpu", reporter=reporter)
    config = with_overrides(loaded.config, assignments or [], sections)
    plan = make_plan(detect_inventory(), config, workload=workload)
    plan.apply()
    plan.place_model(loaded.model)
    return loaded, config, plan
