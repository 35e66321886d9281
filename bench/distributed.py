"""Two gloo processes, one of them slowed, trained with equal shares against measured shares. Prints JSON.

`torchrun --nproc_per_node 2 -m hetlm train` at nanoGPT's baby shape (4 layers, d_model 128, context 64) with a
global batch of --sequences sequences, one thread per process, each process pinned to its own CPU
(`taskset`, through a wrapper torchrun starts with --no-python). Rank 1 gets half of its CPU, so it runs about
2x slower than rank 0: the unequal machine of issue 15, on one box. Where the cgroup v1 CPU controller is
writable (root), a CFS quota of 50% caps it; else a spinning process pinned beside it takes half its CPU (on
a VM whose vCPUs are hyperthreads of one core that slows rank 0 too, and the gap is smaller than 2x).

  equal     train.rank_shares=equal: each process takes half the step, and rank 0 waits for rank 1;
  measure   train.rank_shares=measure: every process times a few forward/backward passes before the run and
            the step is shared by the measured rates.

tokens/s is hetlm's own figure from metrics.jsonl (train records after the first --skip-steps steps, which
hold the warm-up and the measuring); the per-process busy time (rank_step_s) shows how well each balanced.
Runs alternate (equal, measure, equal, ...) so a drift of the machine falls on both; medians are reported.
Target (issue 15): measure >= 1.3x equal when one process is 2x slower.

    .venv/bin/python bench/distributed.py [--steps 150] [--repeats 3] [--sequences 24]

About (2 x repeats) runs of 10-20 s each on 2 CPUs at the defaults, plus preprocessing once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from machine import cpu_report

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
BABY = ["model.n_layers=4", "model.n_heads=4", "model.d_model=128", "model.context_length=64"]
# torchrun starts this for each process: it pins the process to the CPU numbered by its local rank.
PINNED = """#!/bin/sh
if [ "$LOCAL_RANK" = 1 ] && [ -n "{cgroup}" ]; then echo $$ > "{cgroup}/tasks"; fi
exec taskset -c "$LOCAL_RANK" "{python}" -m hetlm "$@"
"""
CGROUP = Path("/sys/fs/cgroup/cpu")


@contextlib.contextmanager
def slowed_rank() -> Iterator[tuple[str, str]]:
    """(cgroup folder or "", how rank 1 is slowed) while rank 1's CPU is halved."""
    group = CGROUP / "hetlm-bench-slow"
    try:
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("50000")
    except OSError:
        spinner = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", "while True: pass"])
        try:
            yield "", "rank 1 shares its CPU with a spinning process"
        finally:
            spinner.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                spinner.wait(timeout=10)
        return
    try:
        yield str(group), "rank 1 runs under a 50% CFS quota (cgroup v1 cpu controller)"
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def preprocess(work: Path) -> Path:
    data = work / "data"
    inputs = [str(SHAKESPEARE)] if SHAKESPEARE.is_file() else []
    subprocess.run([sys.executable, "-m", "hetlm", "preprocess", *inputs, "--out", str(data), "--vocab-size", "1024"],
                   check=True, capture_output=True, cwd=REPO)
    return data


def train(work: Path, data: Path, shares: str, args: argparse.Namespace, index: int) -> dict:
    run = work / f"run-{shares}-{index}"
    sets = [*BABY, f"data.dir={data}", f"train.max_steps={args.steps}", "train.log_every=10",
            f"train.global_batch_tokens={args.sequences * 64}", "train.micro_batch_size=12",
            f"train.eval_every={args.steps * 10}", f"train.checkpoint_every={args.steps * 10}",
            "device.threads=1", "device.compile=off", f"train.rank_shares={shares}"]
    wrapper = work / "pinned.sh"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
               str(wrapper), "train", "--out", str(run), *(a for s in sets for a in ("--set", s))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"training failed ({shares}):\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["kind"] == "train" and r["step"] > args.skip_steps]
    measured = next((line for line in result.stderr.splitlines() if "train.rank_shares=measure" in line), None)
    return {
        "tokens_per_s": statistics.median(r["tok_per_s"] for r in steady),
        "rank_step_ms": [round(statistics.median(r["rank_step_s"][k] for r in steady) * 1000, 2) for k in range(2)],
        "shares": measured.rsplit("shares ", 1)[1].strip() if measured else "equal",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=24, help="sequences of 64 tokens per optimizer step")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 CPUs: one per process")
    runs: dict[str, list[dict]] = {"equal": [], "measure": []}
    with tempfile.TemporaryDirectory(prefix="hetlm-distributed-") as tmp:
        work = Path(tmp)
        data = preprocess(work)
        with slowed_rank() as (cgroup, slowed):
            (work / "pinned.sh").write_text(PINNED.format(python=sys.executable, cgroup=cgroup))
            (work / "pinned.sh").chmod(0o755)
            for index in range(args.repeats):
                for shares in ("equal", "measure"):
                    runs[shares].append(train(work, data, shares, args, index))
                    print(f"{shares}: {runs[shares][-1]}", file=sys.stderr)
    equal = statistics.median(r["tokens_per_s"] for r in runs["equal"])
    measured = statistics.median(r["tokens_per_s"] for r in runs["measure"])
    print(json.dumps({
        "machine": cpu_report(),
        "setup": {"processes": 2, "threads_per_process": 1, "slowed": slowed,
                  "shape": "baby (4 layers, d_model 128, context 64)", "sequences_per_step": args.sequences,
                  "steps": args.steps, "repeats": args.repeats},
        "equal": runs["equal"],
        "measure": runs["measure"],
        "equal_tokens_per_s": round(equal),
        "measure_tokens_per_s": round(measured),
        "speedup_measure_vs_equal": round(measured / equal, 3),
        "target": 1.3,
        "target_met": measured / equal >= 1.3,
    }, indent=2))


if __name__ == "__main__":
    main()
