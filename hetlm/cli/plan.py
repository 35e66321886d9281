"""``hetlm plan``: show the machine and what the planner decides for it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from hetlm.build import resolve_config
from hetlm.cli.app import app, examples
from hetlm.cli.options import ConfigOption, SetOption
from hetlm.cli.render import plan_table, size, stderr, stdout
from hetlm.config import Config, load_config
from hetlm.errors import UsageError
from hetlm.placement import bar
from hetlm.planner import (
    INFERENCE,
    Inventory,
    Plan,
    RankPlan,
    detect_inventory,
    load_inventory,
    make_plan,
    measure_inventory,
    plan_ranks,
    planning_model,
)
from hetlm.store import DataFolder, finished_data_manifest


@app.command("plan", epilog=examples(
    "hetlm plan --config configs/tiny.yaml --workload generate",
    "hetlm plan --inventory tests/inventories/one-8gb-gpu.json --config configs/small.yaml",
    "hetlm plan --inventory tests/inventories/24gb-and-8gb-gpus.json --config configs/small.yaml --nproc 2",
))
def plan(
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    inventory: Annotated[
        Optional[Path],
        typer.Option("--inventory", help="Plan for a simulated machine (JSON; also $HETLM_INVENTORY).", show_default=False),
    ] = None,
    measure: Annotated[bool, typer.Option(
        "--measure", help="Measure this machine's memory bandwidths and GPU links first (a few seconds) instead of "
        "taking nominal figures.")] = False,
    workload: Annotated[str, typer.Option(
        "--workload", help="train, preprocess, or an inference workload: generate (also infer: one sequence), eval "
        "(eval.batch_size sequences) or serve (serve.max_concurrency).")] = "train",
    nproc: Annotated[Optional[int], typer.Option(
        "--nproc", help="Plan training for N processes started by torchrun --nproc_per_node N: each one's device, "
        "share of the step, micro-batches and predicted step time [default: torchrun's WORLD_SIZE, else 1]",
        show_default=False)] = None,
) -> None:
    """Show the hardware found and where each stage will run, in which dtype, and why."""
    resolved, note = _with_vocabulary(load_config(config, set_ or []))
    machine = load_inventory(inventory) if inventory is not None else detect_inventory()
    if measure:
        if inventory is not None:
            raise UsageError("--measure measures this machine; it cannot measure a simulated --inventory")
        machine = measure_inventory(machine, resolved.device.threads or machine.cpu.cores)
    world = nproc if nproc is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise UsageError(f"--nproc must be at least 1, got {world}")
    if world > 1 and workload != "train":
        raise UsageError("--nproc plans training under torchrun; inference runs in one process (use --workload train)")
    ranks = plan_ranks(machine, resolved, world) if world > 1 else None
    result = ranks.plans[0] if ranks is not None else make_plan(machine, resolved, workload)
    if note:
        # After the plan, so that a rejected command prints its one error line only.
        stderr.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), **(ranks.to_dict() if ranks is not None else {})}, indent=2))
        return
    stdout.print(_inventory_table(machine))
    stdout.print(plan_table(result))
    if result.workload in INFERENCE:
        stdout.print(_layer_table(result))
        for line in bar(result.placements, planning_model(resolved).n_layers):
            stdout.print(escape(line), highlight=False)
        stdout.print(f"predicted: {result.decode_tokens_per_s:,.0f} tokens/s per sequence decoding, "
                     f"{result.prefill_tokens_per_s:,.0f} tokens/s prefilling")
    if result.aliases:
        stdout.print("aliasing in force: " + escape(", ".join(f"{a} runs on {b}" for a, b in result.aliases)), highlight=False)
    if result.memory:
        stdout.print(_memory_table(result))
    stdout.print(f"peak {result.peak_flops / 1e12:.2f} TFLOP/s on {result.device} at {result.dtype} (the MFU denominator)")
    if ranks is not None:
        stdout.print(_ranks_table(ranks))
        stdout.print(escape(
            f"predicted idle per step (the least busy process waiting for the slowest): {ranks.idle(ranks.shares):.3g} s "
            f"with these shares, {ranks.idle(ranks.equal):.3g} s with equal shares"), highlight=False)
    memory = next((d for d in result.decisions if d.stage == "memory"), None)
    if memory is not None and not result.fits:
        stdout.print(f"[bold red]does not fit:[/] {escape(memory.reason)}")
    elif memory is not None:
        stdout.print(f"[green]fits:[/] {escape(memory.reason)}")


def _with_vocabulary(config: Config) -> tuple[Config, str | None]:
    """``config`` with the vocabulary of its data folder, as build and train will take it; else a note saying so."""
    folder = Path(config.data.dir)
    if finished_data_manifest(folder) is not None:
        return resolve_config(config, DataFolder.open(folder)), None
    vocab = config.model.vocab_size or config.data.vocab_size
    return config, (f"data folder {folder} is not there (or unfinished): planning with a vocabulary of {vocab} "
                    "(model.vocab_size, else data.vocab_size)")


def _inventory_table(machine: Inventory) -> Table:
    table = Table(title=f"Inventory ({machine.platform}, C compiler: {'yes' if machine.compiler else 'no'})", title_justify="left")
    table.add_column("Device", style="bold")
    table.add_column("What")
    cpu = machine.cpu
    isa = [name for name, present in (("AVX-512", cpu.avx512), ("AMX", cpu.amx), ("AVX512-BF16", cpu.avx512_bf16)) if present]
    table.add_row("cpu", escape(
        f"{cpu.model_name}: {cpu.cores} cores / {cpu.logical_cpus} CPUs usable, {size(cpu.ram_bytes)} RAM"
        + (f" read at {cpu.memory_bandwidth / 1e9:.0f} GB/s" if cpu.memory_bandwidth else "") + ", "
        f"ISA {', '.join(isa) or 'without AVX-512'}"
    ))
    for device in machine.cuda:
        major, minor = device.capability
        table.add_row(f"cuda:{device.index}", escape(
            f"{device.name}: {size(device.free_memory)} free of {size(device.total_memory)}, "
            f"compute capability {major}.{minor}, bf16 {'yes' if device.bf16 else 'no'}"
            + (f", read at {device.memory_bandwidth / 1e9:.0f} GB/s" if device.memory_bandwidth else "")
            + (f", host link {device.link_bandwidth / 1e9:.1f} GB/s" if device.link_bandwidth else "")
        ))
    if machine.mps:
        table.add_row("mps", "Apple GPU sharing the system RAM")
    return table


def _ranks_table(ranks: RankPlan) -> Table:
    parallel = ranks.plans[0].parallel.upper()
    table = Table(title=f"Processes ({parallel}, rank 0's plan above)", title_justify="left")
    for name in ("Rank", "Device", "Share", "Micro-batches", "Step (predicted)", "With equal shares"):
        table.add_column(name, justify="left" if name in ("Device", "Micro-batches") else "right")
    for rank, (plan, part, even) in enumerate(zip(ranks.plans, ranks.shares, ranks.equal, strict=True)):
        table.add_row(str(rank), plan.device, f"{part.sequences} sequences", " + ".join(map(str, part.micro_sizes)),
                      f"{part.step_seconds:.3g} s", f"{even.step_seconds:.3g} s")
    return table


def _layer_table(result: Plan) -> Table:
    table = Table(title="Layer map", title_justify="left")
    table.add_column("Device", style="bold")
    table.add_column("Parts")
    table.add_column("Runs on")
    for segment in result.placements:
        table.add_row(segment.device, segment.describe(), str(result.physical(segment.device)))
    return table


def _memory_table(result: Plan) -> Table:
    table = Table(title="Memory per device", title_justify="left")
    table.add_column("", style="bold")
    for estimate in result.memory:
        table.add_column(estimate.device, justify="right")
    if result.workload in INFERENCE:
        rows = (("weights", "weights (fp32 + decode copies)"), ("kv_cache", "KV cache"), ("activations", "prefill buffers"),
                ("logits", "logits"), ("overhead", "overhead"), ("margin", "margin"), ("total", "total"),
                ("available", "available"))
    else:
        rows = (("weights", "weights (fp32)"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
                ("activations", "activations"), ("logits", "logits"), ("overhead", "overhead"), ("total", "total"),
                ("available", "available"))
    for field, label in rows:
        table.add_row(label, *(size(getattr(e, field)) for e in result.memory))
    table.add_row("fits", *("[green]yes[/]" if e.fits else "[bold red]NO[/]" for e in result.memory))
    return table
