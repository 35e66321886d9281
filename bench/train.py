"""Training throughput: plain fp32 eager PyTorch against hetlm's planned training step. Prints JSON.

For each shape, on random tokens:
  baseline  fp32, eager, torch.optim.AdamW defaults, batches drawn inline (a nanoGPT-style loop);
  planned   what `hetlm train` runs: the planner's dtype, compile choice and threads, AdamW fused where
            available, the background prefetch loader and the sync-free TrainStep.
MFU counts 6 x parameters + attention FLOPs per token (hetlm.model.flops_per_token) against both the
planner's peak and a square-matmul peak measured in each round, for the dtype each mode computes in.
The modes alternate for --rounds rounds and medians are reported: a shared machine's speed drifts.
The planner sizes the run by --max-steps, so its compile choice is the one a run that long would get;
where that is "off", a third mode shows the same plan compiled (what a longer run gets).

    .venv/bin/python bench/train.py [--shapes baby,10m] [--steps 20] [--rounds 3] [--warmup 5] [--vocab 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from hetlm.config import load_config
from hetlm.data import PrefetchLoader, sample_windows
from hetlm.model import Transformer, flops_per_token, parameter_counts
from hetlm.planner import detect_inventory, make_plan
from hetlm.train import TrainStep, learning_rate_at, make_optimizer

SHAPES = {
    # nanoGPT's CPU "baby" run on characters: 0.8M parameters at vocab 65.
    "baby": {"n_layers": 4, "n_heads": 4, "d_model": 128, "context_length": 64, "vocab_size": 65, "batch": 12},
    # nanoGPT's shakespeare-char GPU shape: about 10M parameters at vocab 65.
    "10m": {"n_layers": 6, "n_heads": 6, "d_model": 384, "context_length": 256, "vocab_size": 65, "batch": 16},
}


def matmul_peak(dtype: torch.dtype, seconds: float, n: int = 2048) -> float:
    """FLOP/s of square matmuls in ``dtype`` on this process's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def timed(step, sync, steps: int) -> float:
    """Seconds for ``steps`` steps, until ``sync`` says the device is done."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def baseline(config, tokens: np.ndarray, batch: int):
    """A step function and its sync for the plain loop."""
    torch.manual_seed(0)
    model = Transformer(config.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    T = config.model.context_length

    def step() -> None:
        windows = sample_windows(tokens, batch, T + 1, generator)
        _, loss = model(windows[:, :-1], windows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, lambda: None, lambda: None


def planned(config, plan, tokens: np.ndarray, batch: int):
    """A step function, its sync and its clean-up for what `hetlm train` runs."""
    torch.manual_seed(0)
    device = plan.torch_device
    model = Transformer(config.model).to(device).train()
    plan.prepare_model(model)
    optimizer = make_optimizer(model.named_parameters(), config.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=plan.grad_scaler)
    if plan.compile:
        model.compile_blocks()
    stepper = TrainStep(model, optimizer, scaler, plan, config.train)
    T = config.model.context_length
    loader = PrefetchLoader(tokens, batch, T + 1, torch.Generator().manual_seed(0), prefetch=plan.prefetch,
                            device=device, pin_memory=plan.pin_memory, non_blocking=plan.non_blocking)
    counter = iter(range(10**9))

    def step() -> None:
        stepper(learning_rate_at(next(counter), config.train), loader)

    # read() waits for the device, so the timed region ends when the work does.
    return step, stepper.read, loader.close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="baby,10m", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, alternating the modes; medians are reported")
    parser.add_argument("--max-steps", type=int, default=5000,
                        help="train.max_steps the planner sizes the run by (5000: nanoGPT's shakespeare-char run)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the shape's own, 65 characters)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="device.compile for the planned mode")
    parser.add_argument("--threads", type=int, default=0, help="device.threads (0: the planner's choice)")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="time spent measuring each matmul peak")
    args = parser.parse_args()

    inventory = detect_inventory()
    report = {
        "benchmark": "train",
        "torch": torch.__version__,
        "machine": f"{inventory.cpu.model_name}, {inventory.cpu.cores} cores, {platform.system()}",
        "note": "CPU figures from a machine whose 2 cores were shared with other processes are noisy",
        "shapes": {},
    }
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        batch = shape.pop("batch")
        shape["vocab_size"] = args.vocab or shape["vocab_size"]
        tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], 1_000_000, dtype=np.int64).astype(np.uint16)
        overrides = [f"model.{k}={v}" for k, v in shape.items()] + [f"train.micro_batch_size={batch}",
            f"device.compile={args.compile}", f"device.threads={args.threads}", f"train.max_steps={args.max_steps}",
        ]
        config = load_config(None, overrides)
        plan = make_plan(inventory, config, "train")
        plan.apply()
        fpt = flops_per_token(config.model)
        tokens_per_step = batch * config.model.context_length
        entry = {"params": parameter_counts(config.model)["total"], "flops_per_token": fpt, "batch": batch,
                 "threads": plan.threads, "plan_peak_flops": plan.peak_flops}
        plans = {"baseline": None, "planned": plan}
        if not plan.compile and args.compile == "auto" and inventory.compiler:
            # What a run long enough for the planner to compile gets.
            plans["planned_compiled"] = make_plan(inventory, load_config(None, [*overrides, "device.compile=on"]), "train")
        runs = {}
        for mode, mode_plan in plans.items():
            if mode_plan is None:
                step, sync, close = baseline(config, tokens, batch)
            else:
                step, sync, close = planned(config, mode_plan, tokens, batch)
            # The untimed warm-up steps are where compilation happens.
            runs[mode] = (step, sync, close, timed(step, sync, args.warmup), [], mode_plan.dtype if mode_plan else "fp32")
        on_cpu = plan.torch_device.type == "cpu"
        peaks: dict[str, list[float]] = {dtype: [] for *_, dtype in runs.values()} if on_cpu else {}
        try:
            # Peaks are measured in every round too: on a shared machine the achievable rate drifts.
            for _ in range(args.rounds):
                for dtype, measured in peaks.items():
                    measured.append(matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32, args.peak_seconds))
                for step, sync, _, _, times, _ in runs.values():
                    times.append(timed(step, sync, args.steps))
        finally:
            for _, _, close, *_ in runs.values():
                close()
        for mode, (_, _, _, warm, times, dtype) in runs.items():
            mode_plan = plans[mode]
            if mode_plan is None:
                label = "fp32 eager, AdamW default (foreach), inline batches"
            else:
                probe = make_optimizer(torch.nn.Linear(1, 1).named_parameters(), config.train, mode_plan.torch_device)
                fused = "fused" if probe.param_groups[0].get("fused") else "foreach"
                label = (f"{mode_plan.dtype} (attention {mode_plan.attention_dtype}) on {mode_plan.device}, "
                         f"compile {'on (blocks)' if mode_plan.compile else 'off'}, AdamW {fused}, prefetch thread")
            rates = sorted(args.steps * tokens_per_step / t for t in times)
            rate = statistics.median(rates)
            result = {"mode": label, "tokens_per_s": round(rate), "tokens_per_s_rounds": [round(r) for r in rates],
                      "step_ms": round(1000 * tokens_per_step / rate, 2), "warmup_s": round(warm, 2),
                      "mfu_vs_plan_peak": round(rate * fpt / plan.peak_flops, 4)}
            if dtype in peaks:
                peak = statistics.median(peaks[dtype])
                result["measured_matmul_peak_gflops"] = round(peak / 1e9, 1)
                result["matmul_peak_gflops_rounds"] = [round(p / 1e9) for p in sorted(peaks[dtype])]
                result["mfu_vs_measured_peak"] = round(rate * fpt / peak, 4)
            entry[mode] = result
        entry["compile_decision"] = next(d.reason for d in plan.decisions if d.stage == "compile")
        for mode in plans:
            if mode != "baseline":
                entry[f"speedup_{mode}"] = round(entry[mode]["tokens_per_s"] / entry["baseline"]["tokens_per_s"], 3)
        report["shapes"][name] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
