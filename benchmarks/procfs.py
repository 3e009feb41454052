"""What the fleet benchmark reads of processes and of the machine, straight from /proc.

/proc rather than psutil: the numbers needed (CPU ticks, VmHWM, threads, parents) are a few
lines each, and the benchmark then adds no dependency. Linux only, like the deployment.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): field 3 onwards."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (and of its reaped children, with `children`)."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (pool children of a worker, say)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of one process, MB; 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def proc_threads(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process tree: the root with its reaped children, plus the live descendants."""
    return cpu_seconds(pid, children=True) + sum(cpu_seconds(p) for p in descendants(pid))


def tree_hwm_mb(pid: int) -> float:
    """Sum of the peak RSS of the processes alive now: an upper bound of the tree's peak (the
    peaks need not coincide, and copy-on-write pages shared with the parent count in each)."""
    return vm_hwm_mb(pid) + sum(vm_hwm_mb(p) for p in descendants(pid))


def machine_line() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine: nproc {len(os.sched_getaffinity(0))}, {model}, {mem_gb:.1f} GB RAM, "
        f"load average {load} at the start, Python {platform.python_version()}"
    )
