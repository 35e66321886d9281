"""``hetlm build``."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from hetlm.build import build_run, default_run_dir, resolve_config
from hetlm.cli.app import app, examples
from hetlm.cli.options import ConfigOption, OutOption, SetOption
from hetlm.cli.render import RichReporter, plan_table, stdout
from hetlm.config import Config, load_config
from hetlm.planner import Plan, detect_inventory, make_plan
from hetlm.store import DataFolder, RunDir
from hetlm.train import process_layout


def plan_for(config: Config) -> tuple[Config, Plan]:
    """``config`` resolved against its data folder's tokenizer, and this process's training plan."""
    resolved = resolve_config(config, DataFolder.open(config.data.dir))
    _, world_size, local_rank = process_layout()
    return resolved, make_plan(detect_inventory(), resolved, "train", world_size=world_size, local_rank=local_rank)


@app.command("build", epilog=examples(
    "hetlm build --config configs/tiny.yaml",
    "hetlm build --config configs/tiny.yaml --set model.n_layers=6 --out runs/tiny-deeper",
))
def build(config: ConfigOption = None, set_: SetOption = None, out: OutOption = None) -> None:
    """Build the model against the data folder's tokenizer and write the run folder with its step-0 checkpoint."""
    resolved, plan = plan_for(load_config(config, set_ or []))
    run = RunDir(out if out is not None else default_run_dir(resolved))
    with RichReporter() as reporter, run.claim(reporter):
        result = build_run(resolved, run.path, reporter)
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
    stdout.print(plan_table(plan))
    if not plan.fits:
        stdout.print("[bold red]the plan does not fit in memory; see the memory row above[/]")
    verb = "wrote" if result.created else "kept"
    stdout.print(f"{verb} run {escape(str(result.run_dir))}: config.yaml and {escape(str(result.checkpoint))}", highlight=False)
