"""Where one training step's time goes: torch.profiler's top ops by self CPU time, per step. Prints JSON.

Profiles the step bench/train.py times (the same model, optimizer, loader and plan) at one of its shapes, so
the fixed per-step costs (small ops outside the compiled blocks, the optimizer's per-parameter work, the
loss and LM head, the data copy) can be read beside the matmuls. ``unattributed_ms_per_step`` is the step's
wall time that no profiled op accounts for as self time: Python, dispatch and waiting.

    .venv/bin/python bench/profile_step.py [--mode planned|nanogpt|baseline] [--shape baby] [--vocab 1024]
        [--batch 0] [--steps 20] [--top 25] [--compile off] [--threads 0]

Run time: a few seconds (plus a cold compile, ~1 min, with --compile on).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_report
from torch.profiler import ProfilerActivity, profile
from train import SHAPES, baseline, nanogpt, planned

from hetlm.config import load_config
from hetlm.planner import detect_inventory, make_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="planned", choices=("planned", "nanogpt", "baseline"))
    parser.add_argument("--shape", default="baby", choices=sorted(SHAPES))
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (hetlm's data folders use 1024-4096)")
    parser.add_argument("--batch", type=int, default=0,
                        help="sequences per step (0: the shape's); at 1 the step is mostly its fixed costs")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=10, help="unprofiled steps first")
    parser.add_argument("--top", type=int, default=25, help="ops listed")
    parser.add_argument("--compile", default="off", choices=("auto", "on", "off"), help="device.compile for --mode planned")
    parser.add_argument("--threads", type=int, default=0, help="device.threads (0: the planner's choice)")
    parser.add_argument("--max-steps", type=int, default=5000, help="train.max_steps the planner sizes the run by")
    args = parser.parse_args()

    shape = dict(SHAPES[args.shape])
    batch = args.batch or shape.pop("batch")
    shape.pop("batch", None)
    shape["vocab_size"] = args.vocab
    overrides = [f"model.{k}={v}" for k, v in shape.items()] + [
        f"train.micro_batch_size={batch}", f"device.compile={args.compile}", f"device.threads={args.threads}",
        f"train.max_steps={args.max_steps}"]
    config = load_config(None, overrides)
    plan = make_plan(detect_inventory(), config, "train")
    plan.apply()
    tokens = np.random.default_rng(0).integers(0, args.vocab, 1_000_000, dtype=np.int64).astype(np.uint16)
    with tempfile.TemporaryDirectory(prefix="hetlm-profile-") as scratch:
        bin_path = Path(scratch) / "train.bin"
        tokens.tofile(bin_path)
        if args.mode == "nanogpt":
            step, sync, close, _ = nanogpt(config, bin_path, batch)
        elif args.mode == "baseline":
            step, sync, close = baseline(config, tokens, batch)
        else:
            step, sync, close = planned(config, plan, tokens, batch)
        try:
            for _ in range(args.warmup):
                step()
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            unprofiled = (time.perf_counter() - start) / args.steps
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync()
                profiled = (time.perf_counter() - start) / args.steps
        finally:
            close()
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self_ms = sum(e.self_cpu_time_total for e in averages) / 1000 / args.steps
    ops = [{"op": e.key, "calls_per_step": round(e.count / args.steps, 1),
            "self_ms_per_step": round(e.self_cpu_time_total / 1000 / args.steps, 3),
            "total_ms_per_step": round(e.cpu_time_total / 1000 / args.steps, 3),
            "self_share": round(e.self_cpu_time_total / 1000 / args.steps / total_self_ms, 4)}
           for e in averages[: args.top]]
    tokens_per_step = batch * config.model.context_length
    print(json.dumps({
        "benchmark": "profile_step",
        "cpu": cpu_report(),
        "torch": torch.__version__,
        "mode": args.mode,
        "shape": {**shape, "batch": batch},
        "plan": {"dtype": plan.dtype, "compile": plan.compile, "threads": plan.threads} if args.mode == "planned"
                else {"dtype": "fp32", "compile": False, "threads": torch.get_num_threads()},
        "step_ms_unprofiled": round(1000 * unprofiled, 3),
        "tokens_per_s_unprofiled": round(tokens_per_step / unprofiled),
        "step_ms_profiled": round(1000 * profiled, 3),
        # Self times of all threads (the prefetch thread's too) add up, so on several threads this can exceed the step.
        "op_self_ms_per_step": round(total_self_ms, 3),
        "unattributed_ms_per_step": round(1000 * profiled - total_self_ms, 3),
        "ops_per_step": round(sum(e.count for e in averages) / args.steps, 1),
        "top_ops_by_self_cpu": ops,
    }, indent=2))


if __name__ == "__main__":
    main()
