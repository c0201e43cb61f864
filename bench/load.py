"""How busy the machine was with work that is not the benchmark's.

On a shared machine another process can take a core away in the middle of a phase and
halve a floor or a drain without leaving a trace. :class:`Watch` measures it: the
machine's busy CPU time (``/proc/stat``: user, nice, system, irq, softirq and steal) minus
the CPU time of the benchmark's own process tree (this process, the children it has
reaped, and every live descendant: gateway, broker, worker processes), in cores.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _stat(pid: str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return None


def tree_busy(root: int | None = None) -> float:
    """CPU seconds of process ``root`` (default: this one), the children it has reaped,
    and all its live descendants."""
    root = os.getpid() if root is None else root
    stats: dict[str, list[str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if (fields := _stat(pid)) is not None:
            stats[pid] = fields
    children: dict[str, list[str]] = {}
    for pid, fields in stats.items():
        children.setdefault(fields[1], []).append(pid)  # fields[1] is the parent's id
    total, todo = 0.0, [str(root)]
    while todo:
        pid = todo.pop()
        fields = stats.get(pid)
        if fields is not None:  # utime, stime, then cutime, cstime of reaped children
            total += sum(int(value) for value in fields[11:15]) / _TICKS
        todo.extend(children.get(pid, []))
    return total


@dataclass
class Watch:
    """Started on creation; :meth:`foreign_cores` is the average number of cores that
    other work kept busy since."""

    machine: float = 0.0
    ours: float = 0.0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.machine, self.ours, self.started = machine_busy(), tree_busy(), time.monotonic()

    def foreign_cores(self) -> float:
        machine = machine_busy() - self.machine
        ours = tree_busy() - self.ours
        return max(0.0, machine - ours) / max(time.monotonic() - self.started, 1e-3)
