"""Predicted against measured peak memory of training: plain, with activation checkpointing, with the optimizer offload.

Each mode trains ``--steps`` steps of one model in its own process (``hetlm train``), whose peak RSS is read at
its end (``getrusage``); the plan's figure is what ``hetlm plan --json`` predicts for the same settings (on the CPU
the offloaded state is in the same RAM, so the two estimates are summed). Tokens per second come from the run's
``metrics.jsonl`` (its last interval). On a CUDA machine, ``--device cuda`` reports ``max_memory_allocated``
instead of RSS. The modes run one after another, ``--rounds`` times, alternating; medians are printed as JSON.

    .venv/bin/python bench/memory.py [--steps 30] [--rounds 2] [--shape 10m] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "baby": ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.context_length=64",
             "train.micro_batch_size=12"],
    "10m": ["model.n_layers=6", "model.d_model=384", "model.n_heads=6", "model.context_length=256",
            "train.micro_batch_size=16"],
}
MODES = {
    "plain": ["train.activation_checkpointing=none", "train.optimizer_offload=off"],
    "checkpointed": ["train.activation_checkpointing=all", "train.optimizer_offload=off"],
    "offloaded": ["train.activation_checkpointing=none", "train.optimizer_offload=on"],
}
# Runs hetlm's CLI in this process and reports its own peak memory when it is done.
CHILD = """
import json, resource, sys, torch
from hetlm.cli import run
code = run(sys.argv[2:])
peak = torch.cuda.max_memory_allocated() if sys.argv[1] == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"code": code, "peak": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", default="10m", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        corpus = Path(work) / "corpus.txt"
        stdlib = Path(sys.executable).resolve().parent.parent / "lib"
        files = sorted(Path(p) for p in stdlib.glob("python3*/*.py"))[:60]
        corpus.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in files), encoding="utf-8")
        subprocess.run([sys.executable, "-m", "hetlm", "preprocess", str(corpus), "--out", str(data), "--vocab-size",
                        "2048"], check=True, capture_output=True)
        common = [*SHAPES[args.shape], f"data.dir={data}", f"train.max_steps={args.steps}", "train.eval_every=100000",
                  "train.checkpoint_every=100000", "train.log_every=10", f"device.device={args.device}",
                  "device.compile=off"]
        results: dict[str, dict[str, list[float]]] = {m: {"peak": [], "tokens_per_s": []} for m in MODES}
        predicted = {}
        for mode, sets in MODES.items():
            plan = subprocess.run([sys.executable, "-m", "hetlm", "plan", "--json",
                                   *[a for s in [*common, *sets] for a in ("--set", s)]],
                                  check=True, capture_output=True, text=True)
            memory = json.loads(plan.stdout)["memory"]
            predicted[mode] = sum(m["total"] for m in memory) if args.device == "cpu" else memory[0]["total"]
        for round_ in range(args.rounds):
            for mode, sets in MODES.items():
                out = Path(work) / f"{mode}-{round_}"
                child = subprocess.run(
                    [sys.executable, "-c", CHILD, args.device, "train", "--out", str(out), "--resume", "never",
                     *[a for s in [*common, *sets] for a in ("--set", s)]], capture_output=True, text=True)
                report = json.loads(child.stdout.strip().splitlines()[-1])
                assert report["code"] == 0, child.stderr
                records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                rate = [r["tok_per_s"] for r in records if r["kind"] == "train"][-1]
                results[mode]["peak"].append(report["peak"])
                results[mode]["tokens_per_s"].append(rate)
    modes = {}
    for mode, figures in results.items():
        peak = statistics.median(figures["peak"])
        modes[mode] = {"predicted_mib": round(predicted[mode] / 2**20, 1), "measured_mib": round(peak / 2**20, 1),
                       "measured_over_predicted": round(peak / predicted[mode], 3),
                       "tokens_per_s": round(statistics.median(figures["tokens_per_s"]))}
    plain_rate = modes["plain"]["tokens_per_s"]
    for mode in modes:
        modes[mode]["speed_vs_plain"] = round(modes[mode]["tokens_per_s"] / plain_rate, 3)
    print(json.dumps({"benchmark": "memory", "shape": args.shape, "device": args.device, "steps": args.steps,
                      "measure": "peak RSS" if args.device == "cpu" else "max_memory_allocated", "modes": modes},
                     indent=2))


if __name__ == "__main__":
    main()
