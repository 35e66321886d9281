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


def load_for_inference(target: Path, assignments: list[str] | None,
                       sections: tuple[str, ...]) -> tuple[LoadedModel, Config, Plan]:
    """The model at ``target`` on the device an inference plan chose, its config with ``--set`` applied to ``sections``.

    The model's shape and tokenizer come with the weights; only ``sections`` may be overridden.
    """
    with RichReporter() as reporter:
        loaded = load_checkpoint(target, "cpu", reporter=reporter)
    config = with_overrides(loaded.config, assignments or [], sections)
    plan = make_plan(detect_inventory(), config, workload="infer")
    plan.apply()
    loaded.model.to(plan.torch_device)
    return loaded, config, plan
