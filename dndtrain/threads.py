"""How waiting OpenMP threads behave (torch's CPU thread pool); must be decided before torch is first imported."""

from __future__ import annotations

import os

QUIET_BUSY_CORES = 0.5
"""The machine counts as quiet when other processes keep fewer cores than this busy."""

SPIN_COUNT = "10000"
"""`GOMP_SPINCOUNT` on a quiet machine: how long an idle torch thread spins before it sleeps."""


def busy_cores(window_s: float = 0.2) -> float | None:
    """How many cores are busy right now: /proc/stat sampled over `window_s` (None where there is no /proc/stat).
    Unlike the load average, this does not remember a command that just finished (setup, a previous step)."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def choose_openmp_waiting(busy: float | None = None) -> dict[str, str]:
    """The OpenMP setting for how many cores other processes keep busy (`busy_cores()` when `busy` is None).

    A training step runs thousands of small parallel regions, so the cost of waking a sleeping thread adds up:
    measured on a quiet 2-core Intel Xeon (AMX, bf16), 40 steps of the default training: sleeping at once
    (`OMP_WAIT_POLICY=PASSIVE`) 601 tokens/s, spinning 10,000 rounds first 767, libgomp's default 756. But when
    another process is using one of the two cores, spinning threads steal its time and are preempted themselves:
    default 75 tokens/s, 10,000 rounds 345, passive 499. So: brief spinning when the machine is quiet, sleeping
    when it is not."""
    if busy is None:
        busy = busy_cores()
    if busy is None:
        return {"OMP_WAIT_POLICY": "PASSIVE"}  # cannot tell: the safe choice
    return {"GOMP_SPINCOUNT": SPIN_COUNT} if busy < QUIET_BUSY_CORES else {"OMP_WAIT_POLICY": "PASSIVE"}


def set_openmp_waiting(busy: float | None = None) -> dict[str, str]:
    """Apply `choose_openmp_waiting` to the environment unless the user already set either variable; returns what
    was set. Takes effect only before torch is first imported in the process."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    chosen = choose_openmp_waiting(busy)
    os.environ.update(chosen)
    return chosen
