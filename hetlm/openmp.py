"""How torch's OpenMP threads wait, chosen before torch starts its thread pool (torch-free, so it can run first).

Idle OpenMP threads spin for a while before they sleep. On a machine whose cores other programs are using, a
spinning thread holds a core the thread it waits for needs, and every parallel region waits for a descheduled
thread: measured on 2 shared cores at a load average of 6-8, a small matmul loop took 0.8-2.3 ms per iteration
with 2 spinning threads, 0.14-0.22 ms with OMP_WAIT_POLICY=PASSIVE and 0.11-0.17 ms with 1 thread. On an idle
machine spinning saves the wake-up of each parallel region, so the policy turns passive only when the load at
start shows other work.
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"
# Load (runnable processes, averaged over a minute) per usable CPU above which waiting threads sleep.
BUSY_LOAD_PER_CPU = 0.5


def load_average() -> float:
    """The 1-minute load average, 0.0 where the system does not report one (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_wait_policy() -> str:
    """Set OMP_WAIT_POLICY for this process (unless the user has) and return the policy in force."""
    if WAIT_POLICY not in os.environ and load_average() >= BUSY_LOAD_PER_CPU * usable_cpus():
        os.environ[WAIT_POLICY] = "PASSIVE"
    return os.environ.get(WAIT_POLICY, "default").lower()
