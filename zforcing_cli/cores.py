"""How many cores this process may use, and --threads held to them: without torch, so that
the command line checks its options before loading it."""

from __future__ import annotations

import os


def machine_cores() -> int:
    """Cores this process may run on (taskset/cgroup affinity where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def capped_threads(requested: int) -> tuple[int, str | None]:
    """A fixed thread count, at most one per core, and the warning when it had to be lowered:
    threads beyond the cores only wait for each other (1,000 threads on 2 cores trained about
    150 times slower than one)."""
    cores = machine_cores()
    if requested <= cores:
        return requested, None
    return cores, (f"--threads {requested:,} is more than the {cores:,} core{'s' if cores > 1 else ''} this process "
                   f"may run on: using {cores:,}.")
