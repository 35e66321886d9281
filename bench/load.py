"""hetlm's speed idle and beside a competing load, with the planner's thread count against fixed ones. Prints JSON.

Each command runs as a user runs it, through the CLI in its own process: `hetlm train` at nanoGPT's baby shape
(4 layers, 4 heads, d_model 128, context 64, batch 12; add the ~10M shape with --shapes baby,10m), `hetlm eval`
and `hetlm generate` (greedy; both on the baby model, trained for a few seconds first), each with

  planner     no thread setting (device.threads=0): the planner's choice, read from `hetlm plan --json` run
              just before under the same conditions;
  threads_1   --set device.threads=1;
  threads_N   --set device.threads=N, N being the CPUs this process may use;

and each both

  idle        nothing started by the bench;
  loaded      N processes spinning `while True: pass` beside it (half the CPU time is taken), started by the
              bench and killed in a finally, on errors and on SIGTERM too.

tokens/s is hetlm's own figure, so process start-up and model loading do not count: metrics.jsonl's train
records after the first log interval (which holds the warm-up), eval --json's tokens_per_second and the rate
on generate's closing line. Repeats alternate idle and loaded (ABAB) and rotate the order of the thread
settings, so a machine's drift falls on all of them alike; medians are reported. The planner reads the load
when it starts, and the 1-minute load average lags a change by about a minute, so before each phase the bench
waits (at most --settle-seconds) for the load average to show it: above 0.8 per CPU when loaded, below 0.5
(where hetlm.openmp starts treating the machine as busy) when idle. --settle-seconds 0 measures instead a load
that has only just begun, which a planner reading the load average cannot see yet. On a machine others are
using the idle phase cannot be idle; the load seen at each start is in the JSON.

Targets (issue 19), per command: under load the planner's rate within 10% of the best fixed thread count
(planner_vs_best_fixed_loaded >= 0.9) and at least 40% of its own idle rate (planner_loaded_vs_idle >= 0.4).

    .venv/bin/python bench/load.py [--shapes baby[,10m]] [--seconds-per-run 10] [--repeats 2] [--quick]

Run time: about (commands x 2 phases x 3 settings x repeats) runs of --seconds-per-run plus 5-10 s of start-up
each, plus the settling waits: ~20 min at the defaults on 2 CPUs, ~3 min with --quick. Slow settings under load
take longer than --seconds-per-run for eval and generate, whose sizes are fixed from the idle warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_report

from hetlm.openmp import BUSY_LOAD_PER_CPU, load_average, usable_cpus

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 1024
SHAPES = {
    "baby": {"model.n_layers": 4, "model.n_heads": 4, "model.d_model": 128, "model.context_length": 64,
             "train.micro_batch_size": 12},
    "10m": {"model.n_layers": 6, "model.n_heads": 6, "model.d_model": 384, "model.context_length": 256,
            "train.micro_batch_size": 16},
}
# Steps per metrics record: several records per run, so the first (warm-up) interval can be dropped. A 10M step
# takes seconds on a few cores, so that shape also trains longer per run to leave more than one interval.
LOG_EVERY = {"baby": 10, "10m": 1}
SECONDS_FACTOR = {"baby": 1, "10m": 3}
LOADED_LOAD_PER_CPU = 0.8
GENERATE_RATE = re.compile(r"(\d+) tokens in [\d.]+ s \(([\d,.]+) tok/s\)")


def hetlm(*args: str, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "hetlm", *args], capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    if done.returncode:
        raise RuntimeError(f"hetlm {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def sets(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@contextlib.contextmanager
def competing_load(n: int):
    spinners = []
    try:
        for _ in range(n):
            spinners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def settle(loaded: bool, cpus: int, limit: float) -> dict:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        load = load_average()
        if (load >= LOADED_LOAD_PER_CPU * cpus) if loaded else (load < BUSY_LOAD_PER_CPU * cpus):
            break
        time.sleep(1)
    return {"waited_s": round(time.monotonic() - started, 1), "load": round(load_average(), 2)}


class Runner:
    def __init__(self, work: Path, seconds: float, timeout: float) -> None:
        self.work, self.seconds, self.timeout = work, seconds, timeout
        self.count = 0
        self.templates: dict[str, Path] = {}
        self.infer_run: Path | None = None
        self.eval_tokens = self.generate_tokens = 0

    def setup(self, text: Path | None, shapes: list[str]) -> dict:
        data = self.work / "data"
        inputs = [str(text)] if text else []
        hetlm("preprocess", *inputs, "--out", str(data), "--vocab-size", str(VOCAB), timeout=self.timeout)
        for shape in shapes:
            template = self.work / f"template-{shape}"
            hetlm("build", *sets({"data.dir": data, "model.dropout": 0, **SHAPES[shape]}), "--out", str(template),
                  timeout=self.timeout)
            self.templates[shape] = template
        # Untimed: warms the page cache and gives eval and generate a model that has seen the text.
        warm = self.train("baby", 0, keep=True)
        self.infer_run = self.work / f"run-{self.count}"
        eval_rate = self.eval(0, 20_000)["tokens_per_s"]
        generate_rate = self.generate(0, 300)["tokens_per_s"]
        # Sized from the idle planner's rate, so an idle run lasts about --seconds-per-run.
        self.eval_tokens = max(5_000, round(eval_rate * self.seconds))
        self.generate_tokens = max(100, min(20_000, round(generate_rate * self.seconds)))
        return {"text": str(text) if text else "built-in corpus", "vocab_size": VOCAB,
                "warmup_tokens_per_s": {"train_baby": warm["tokens_per_s"], "eval": round(eval_rate),
                                        "generate": round(generate_rate, 1)},
                "eval_tokens": self.eval_tokens, "generate_max_new_tokens": self.generate_tokens}

    def fresh_run(self, shape: str) -> Path:
        self.count += 1
        run = self.work / f"run-{self.count}"
        shutil.copytree(self.templates[shape], run)
        return run

    def train(self, shape: str, threads: int, keep: bool = False) -> dict:
        run = self.fresh_run(shape)
        seconds = self.seconds * SECONDS_FACTOR[shape]
        done = hetlm("train", str(run), "--max-time", f"{seconds:g}s", *sets({
            "device.threads": threads, "train.log_every": LOG_EVERY[shape], "train.max_steps": 10**7,
            "train.eval_every": 10**7, "train.checkpoint_every": 10**7, "train.keep_last": 1,
        }), timeout=self.timeout + 20 * seconds)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if r["kind"] == "train"]
        first, last = records[0], records[-1]
        if len(records) >= 2:
            rate = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
            timed = last["step"] - first["step"]
        else:
            # Too short a run for more than one interval: its rate includes the warm-up.
            rate, timed = last["tok_per_s"], 0
        if not keep:
            shutil.rmtree(run)
        return {"tokens_per_s": round(rate), "timed_steps": timed, "compiled": ", compiled" in done.stdout}

    def eval(self, threads: int, tokens: int = 0) -> dict:
        done = hetlm("eval", str(self.infer_run), "--json", "--split", "train", "--max-tokens", str(tokens or self.eval_tokens),
                     *sets({"device.threads": threads}), timeout=self.timeout + 20 * self.seconds)
        record = json.loads(done.stdout.strip().splitlines()[-1])
        return {"tokens_per_s": round(record["tokens_per_second"]), "tokens": record["tokens"]}

    def generate(self, threads: int, tokens: int = 0) -> dict:
        # Greedy: sampled text from a briefly trained model soon ends at </s>, greedy text runs to the length asked.
        done = hetlm("generate", str(self.infer_run), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens",
                     str(tokens or self.generate_tokens), *sets({"device.threads": threads}),
                     timeout=self.timeout + 20 * self.seconds)
        found = GENERATE_RATE.search(done.stderr)
        if found is None:
            raise RuntimeError(f"no rate in hetlm generate's output:\n{done.stderr[-2000:]}")
        return {"tokens_per_s": float(found[2].replace(",", "")), "tokens": int(found[1])}

    def planner_choice(self, command: str) -> dict:
        shape = command.removeprefix("train_")
        config = (self.templates[shape] if command.startswith("train_") else self.infer_run) / "config.yaml"
        workload = "train" if command.startswith("train_") else command
        done = hetlm("plan", "--json", "--workload", workload, "--config", str(config), "--set", "device.threads=0",
                     timeout=self.timeout)
        plan = json.loads(done.stdout)
        cpu = plan["inventory"]["cpu"]
        return {"threads": plan["threads"], "plan_load": cpu["load"], "wait_policy": cpu["wait_policy"]}

    def measure(self, command: str, threads: int) -> dict:
        if command.startswith("train_"):
            return self.train(command.removeprefix("train_"), threads)
        return self.eval(threads) if command == "eval" else self.generate(threads)


def summarise(rows: dict, variants: dict[str, int]) -> dict:
    entry: dict = {}
    for condition, by_variant in rows.items():
        entry[condition] = {}
        for variant, runs in by_variant.items():
            result = {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
                      "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
                      "load_at_start": [r["load_at_start"] for r in runs]}
            if variant == "planner":
                result["threads"] = [r["threads"] for r in runs]
                result["wait_policy"] = sorted({r["wait_policy"] for r in runs})
            if any(r.get("compiled") for r in runs):
                result["compiled_runs"] = sum(bool(r.get("compiled")) for r in runs)
            entry[condition][variant] = result
    fixed = [v for v in variants if v != "planner"]
    rate = {c: {v: entry[c][v]["tokens_per_s"] for v in variants} for c in entry}
    if "loaded" in rate:
        best = max(fixed, key=lambda v: rate["loaded"][v])
        entry["planner_threads_loaded"] = entry["loaded"]["planner"]["threads"]
        entry["best_fixed_loaded"] = best
        entry["planner_vs_best_fixed_loaded"] = round(rate["loaded"]["planner"] / rate["loaded"][best], 3)
    if "idle" in rate:
        best = max(fixed, key=lambda v: rate["idle"][v])
        entry["best_fixed_idle"] = best
        entry["planner_vs_best_fixed_idle"] = round(rate["idle"]["planner"] / rate["idle"][best], 3)
    if len(rate) == 2:
        entry["planner_loaded_vs_idle"] = round(rate["loaded"]["planner"] / rate["idle"]["planner"], 3)
        entry["targets_met"] = {"planner >= 0.9 x best fixed, loaded": entry["planner_vs_best_fixed_loaded"] >= 0.9,
                                "planner loaded >= 0.4 x idle": entry["planner_loaded_vs_idle"] >= 0.4}
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="baby", help="training shapes, comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--commands", default="train,eval,generate", help="comma-separated subset of train,eval,generate")
    parser.add_argument("--seconds-per-run", type=float, default=10.0, help="length of each idle run (train: --max-time)")
    parser.add_argument("--repeats", type=int, default=2, help="idle/loaded rounds, alternating; medians are reported")
    parser.add_argument("--settle-seconds", type=float, default=120.0,
                        help="longest wait for the load average to follow each phase's start")
    parser.add_argument("--text", type=Path, default=SHAKESPEARE if SHAKESPEARE.is_file() else None,
                        help="corpus to preprocess (default: ../shared/data/tinyshakespeare.txt, else the built-in one)")
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: a temporary one, removed)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each hetlm process may take beyond its run")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 3 s runs, 1 repeat, 10 s settling, unless given explicitly")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(seconds_per_run=3.0, repeats=1, settle_seconds=10.0)
        args = parser.parse_args()
    # SIGTERM normally skips finally blocks; as SystemExit it runs them, so the spinners die with the bench.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    cpus = usable_cpus()
    variants = {"planner": 0, "threads_1": 1, f"threads_{cpus}": cpus}
    if cpus == 1:
        del variants["threads_1"]
    wanted = args.commands.split(",")
    commands = [f"train_{s}" for s in args.shapes.split(",") if "train" in wanted] + \
               [c for c in ("eval", "generate") if c in wanted]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hetlm-load-")))
        work.mkdir(parents=True, exist_ok=True)
        runner = Runner(work, args.seconds_per_run, args.timeout)
        print(f"setting up in {work}", file=sys.stderr)
        setup = runner.setup(args.text, args.shapes.split(","))
        rows = {c: {phase: {v: [] for v in variants} for phase in ("idle", "loaded")} for c in commands}
        phases = []
        for repeat in range(args.repeats):
            for phase in ("idle", "loaded"):
                with competing_load(cpus) if phase == "loaded" else contextlib.nullcontext():
                    phases.append({"repeat": repeat, "phase": phase, **settle(phase == "loaded", cpus, args.settle_seconds)})
                    order = list(variants)[repeat % len(variants):] + list(variants)[: repeat % len(variants)]
                    for command in commands:
                        for variant in order:
                            row = {"load_at_start": round(load_average(), 2)}
                            if variant == "planner":
                                row.update(runner.planner_choice(command))
                            row.update(runner.measure(command, variants[variant]))
                            rows[command][phase][variant].append(row)
                            print(f"{phase} {command} {variant}: {row}", file=sys.stderr)
    report = {
        "benchmark": "load",
        "cpu": cpu_report(),
        "competing_processes": cpus,
        "seconds_per_run": args.seconds_per_run,
        "repeats": args.repeats,
        "statistic": "median",
        "setup": setup,
        "phases": phases,
        "commands": {c: summarise(rows[c], variants) for c in commands},
        "wall_s": round(time.monotonic() - started),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
