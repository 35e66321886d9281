"""How torch's OpenMP threads wait, chosen before torch starts its thread pool (torch-free, so it can run first).

Idle OpenMP threads spin for a while before they sleep. On a machine whose cores other programs are using, a
spinning thread holds a core the thread it waits for needs, and every parallel region waits for a descheduled
thread: measured on 2 shared cores at a load average of 6-8, a small matmul loop took 0.8-2.3 ms per iteration
with 2 spinning threads, 0.14-0.22 ms with OMP_WAIT_POLICY=PASSIVE and 0.11-0.17 ms with 1 thread. On an idle
machine spinning saves the wake-up of each parallel region, so the policy turns passive only when the load at
start shows other work.

The load at start is sampled, not averaged: the 1-minute load average lags, so right after another program
ends it still counts it (measured 0.9-1.1 on an idle 2-CPU machine between benchmark runs, which made the
planner leave a core idle: 16.3k against 20.6k tokens/s at the baby shape).
"""

from __future__ import annotations

import functools
import os
import time

WAIT_POLICY = "OMP_WAIT_POLICY"
# Load (other programs' runnable threads) per usable CPU above which waiting threads sleep.
BUSY_LOAD_PER_CPU = 0.5
# /proc/stat's running count, read this many times this far apart: 50 ms at start-up.
LOAD_SAMPLES, LOAD_INTERVAL_S = 6, 0.01


def load_average() -> float:
    """The 1-minute load average, 0.0 where the system does not report one (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


@functools.cache
def load_now() -> float:
    """Other programs' runnable threads as this process starts: the mean of /proc/stat's procs_running over
    LOAD_SAMPLES reads, less this process's own thread and its torchrun siblings; the 1-minute load average where
    there is no /proc/stat.
    Taken once per process, so every decision sees the same figure."""
    counts = []
    try:
        for sample in range(LOAD_SAMPLES):
            if sample:
                time.sleep(LOAD_INTERVAL_S)
            with open("/proc/stat", encoding="ascii") as stat:
                running = next(line for line in stat if line.startswith("procs_running"))
            counts.append(int(running.split()[1]) - 1)
    except (OSError, StopIteration, ValueError):
        return load_average()
    # Under torchrun the other processes of this run start alongside: they are not another program's load.
    siblings = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1
    return max(0.0, sum(counts) / len(counts) - siblings)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_wait_policy() -> str:
    """Set OMP_WAIT_POLICY for this process (unless the user has) and return the policy in force."""
    if WAIT_POLICY not in os.environ and load_now() >= BUSY_LOAD_PER_CPU * usable_cpus():
        os.environ[WAIT_POLICY] = "PASSIVE"
    return os.environ.get(WAIT_POLICY, "default").lower()
