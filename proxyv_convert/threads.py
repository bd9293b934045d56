"""CPU threads: torch's default, one per core in every process, makes each step several times slower when other
work shares the cores (the threads wait on each other). `--threads` sets the count; without it, a busy machine gets a
one-line hint. `benchmarks/busy_threads.py` measures it.
"""

from __future__ import annotations

import os
import sys

from .errors import ProxyVError

_chosen = False  # set_threads was given a count


def usable_cores() -> int:
    """The cores this process may run on, within its cgroup's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as file:
            quota, period = file.read().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def busy_hint(threads: int, cores: int, load: float) -> str | None:
    """The hint for a machine whose other work (`load`, the 1-minute load average) leaves fewer cores than threads."""
    free = cores - load
    if threads < 2 or free >= threads - 0.5:
        return None
    return (
        f"note: the CPU is busy (load average {load:.1f} on {cores} cores) and torch computes with {threads} threads; "
        "threads that wait for busy cores can make every step several times slower: if it is slow, pass --threads 1"
    )


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads in torch (None: leave torch's default)."""
    import torch

    if threads is None:
        return
    if threads < 1:
        raise ProxyVError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    global _chosen
    _chosen = True  # the user's choice: no hint


def warn_if_busy(warn=lambda message: print(message, file=sys.stderr)) -> None:
    """Before long CPU work: a one-line hint when torch's threads outnumber the cores other work leaves free."""
    import torch

    if _chosen or torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return
    hint = busy_hint(torch.get_num_threads(), usable_cores(), os.getloadavg()[0])
    if hint:
        warn(hint)
