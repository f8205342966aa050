"""How waiting OpenMP threads behave (torch's CPU thread pool); must be decided before torch is first imported."""

from __future__ import annotations

import os

QUIET_LOAD = 0.5
"""1-minute load average below which the machine counts as quiet (nothing else is using a core)."""

SPIN_COUNT = "10000"
"""`GOMP_SPINCOUNT` on a quiet machine: how long an idle torch thread spins before it sleeps."""


def choose_openmp_waiting(load: float | None = None) -> dict[str, str]:
    """The OpenMP setting for this machine's current load (`os.getloadavg()` when `load` is None).

    A training step runs thousands of small parallel regions, so the cost of waking a sleeping thread adds up:
    measured on a quiet 2-core Intel Xeon (AMX, bf16), 40 steps of the default training: sleeping at once
    (`OMP_WAIT_POLICY=PASSIVE`) 601 tokens/s, spinning 10,000 rounds first 767, libgomp's default 756. But when
    another process is using one of the two cores, spinning threads steal its time and are preempted themselves:
    default 75 tokens/s, 10,000 rounds 345, passive 499. So: brief spinning when the machine is quiet, sleeping
    when it is not."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = QUIET_LOAD
    return {"GOMP_SPINCOUNT": SPIN_COUNT} if load < QUIET_LOAD else {"OMP_WAIT_POLICY": "PASSIVE"}


def set_openmp_waiting(load: float | None = None) -> dict[str, str]:
    """Apply `choose_openmp_waiting` to the environment unless the user already set either variable; returns what
    was set. Takes effect only before torch is first imported in the process."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    chosen = choose_openmp_waiting(load)
    os.environ.update(chosen)
    return chosen
