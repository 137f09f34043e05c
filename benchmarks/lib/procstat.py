"""What running processes use, read from Linux /proc: CPU time, resident memory, open-files
limits (this process's own too)."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path
from typing import Any


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), e.g. the sidecar's worker processes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int, tree: bool = False) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None.

    `tree`: its descendants' too (the sidecar with `sidecar.workers` is a supervisor whose
    workers do the work; their time reaches the parent's own counters only once reaped).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if tree:
        total += sum(cpu_seconds(child) or 0.0 for child in descendants(pid))
    return total


def self_cpu_seconds() -> float:
    """User + system CPU time of this process (the load generator) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's children that have ended and been waited for
    (wrk runs: the load generator when it is wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_kb(pid: int) -> int | None:
    """Resident set size of a process in KiB (VmRSS in /proc/<pid>/status), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a running process (/proc/<pid>/limits), or None."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


def raise_open_files_limit() -> dict[str, Any]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": before, "soft": soft, "hard": hard}
