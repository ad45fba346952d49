"""Memory and CPU of a process tree, from /proc (VmRSS; utime+stime of every thread), and how
busy a CPU was (/proc/stat)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")
_STAT = _PROC / "stat"


def parse_vmrss_kib(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError("no VmRSS line in /proc/PID/status")


def parse_cpu_ticks(stat_text: str) -> int:
    """utime+stime from /proc/PID/stat (fields 14 and 15; the comm field may hold spaces)."""
    fields = stat_text[stat_text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14 -> index 11, stime 15 -> index 12
    return int(fields[11]) + int(fields[12])


def tree(pid: int) -> list[int]:
    """pid and its descendants (Squid or a shell wrapper may fork helpers)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 256:
        p = todo.pop()
        out.append(p)
        for task in (_PROC / str(p) / "task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return out


def rss_mib(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            total += parse_vmrss_kib((_PROC / str(p) / "status").read_text())
        except (OSError, ValueError):
            continue  # exited, or a zombie without VmRSS
    return total / 1024


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            total += parse_cpu_ticks((_PROC / str(p) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
    return total / _TICKS


def parse_schedstat(text: str) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for a CPU) from /proc/PID/task/TID/schedstat."""
    on_cpu, waiting, _ = text.split()
    return int(on_cpu), int(waiting)


def runqueue_wait_seconds(pid: int) -> float:
    """Time the tree's threads were ready to run but another process had their CPU.

    On a shared machine this is the noise: a proxy pinned to a busy core waits here.
    0.0 where the kernel keeps no scheduler statistics.
    """
    total = 0
    for p in tree(pid):
        for task in (_PROC / str(p) / "task").glob("*/schedstat"):
            try:
                total += parse_schedstat(task.read_text())[1]
            except (OSError, ValueError):
                continue
    return total / 1e9


def parse_core_ticks(stat_text: str, cpu: int) -> tuple[int, int]:
    """(busy, all) clock ticks of one CPU from /proc/stat: busy is everything but idle and
    iowait (user, nice, system, irq, softirq, steal; guest time is inside user and nice)."""
    prefix = f"cpu{cpu} "
    for line in stat_text.splitlines():
        if line.startswith(prefix):
            values = [int(v) for v in line.split()[1:9]]
            if len(values) < 5:
                break
            total = sum(values)
            return total - values[3] - values[4], total
    raise ValueError(f"no cpu{cpu} line with its times in /proc/stat")


class CoreBusy:
    """How busy one CPU was over the ``with`` blocks it wraps, summed across them.

    The bench reads it for the load generators' core: a rate measured while that core was
    saturated says how much the load generators and the upstream could do, not the proxy.
    ``cpu`` None (nothing pinned): nothing is read and ``share`` is NaN.
    """

    def __init__(self, cpu: int | None, read: Callable[[], str] = _STAT.read_text) -> None:
        self.cpu = cpu
        self._read = read
        self.busy = 0
        self.total = 0
        self._start: tuple[int, int] | None = None

    def __enter__(self) -> CoreBusy:
        if self.cpu is not None:
            self._start = parse_core_ticks(self._read(), self.cpu)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cpu is not None and self._start is not None:
            busy, total = parse_core_ticks(self._read(), self.cpu)
            self.busy += busy - self._start[0]
            self.total += total - self._start[1]
            self._start = None

    @property
    def share(self) -> float:
        return self.busy / self.total if self.total else float("nan")


class PeakRss:
    """Samples the tree's RSS every ``interval`` seconds in a thread while in a ``with`` block."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_mib(self.pid))
