"""Where the time went during one measurement: wall time, CPU of this process and of named
child processes, and how busy the whole machine was (/proc/stat, so PostgreSQL and any
other process count too). From these, `Meter.limit` names the limit a figure is near.
Also which process holds which TCP sockets of a port (`connections`, `listening`).
Linux only (/proc); elsewhere the CPU figures read as zero.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
CPUS = len(os.sched_getaffinity(0))


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of this process (pid None) or of a child, 0.0 if unreadable."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def queued_seconds(pid: int | None = None) -> float:
    """Seconds the threads of this process (pid None) or of `pid` spent runnable but not
    running, waiting for a core (schedstat's second field), 0.0 if unreadable."""
    total = 0
    for path in Path(f"/proc/{pid or 'self'}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(path.read_text().split()[1])
    return total / 1e9


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (e.g. `serve --workers N`'s forks)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _sockets(pid: int) -> set[int]:
    """The inodes of the sockets `pid` holds open (its file descriptors)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = fd.readlink().name
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _tcp(port: int, state: str) -> set[int]:
    """The inodes of the TCP sockets on local `port` in `state` (01 established, 0A listen)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(fields[9]))
    return inodes


def connections(port: int, pids: list[int]) -> list[int]:
    """How many established TCP connections to local `port` each of `pids` holds."""
    established = _tcp(port, "01")
    return [len(_sockets(pid) & established) for pid in pids]


def listening(port: int, pids: list[int]) -> list[set[int]]:
    """The listening sockets on local `port` (inodes) each of `pids` holds."""
    listen = _tcp(port, "0A")
    return [_sockets(pid) & listen for pid in pids]


def process_tree(name: str, pid: int) -> dict[str, int]:
    """{name0: pid, name1: first child, ...}: a process and its live children, for
    `Meter(**process_tree("serve", pid))` and `Meter.cores("serve")`."""
    return {f"{name}{i}": p for i, p in enumerate([pid, *children(pid)])}


def _machine() -> tuple[int, int, int]:
    """Jiffies of all CPUs since boot: total, idle, iowait."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0, 0
    return sum(values[:8]), values[3], values[4]  # user..steal; guest is inside user


class Meter:
    """Start at construction; `sample()` while children live (their /proc entry goes away
    when they are reaped); `stop()` once, then read `wall`, `own`, `used`, `busy`."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.began = time.monotonic()
        self.own_start = cpu_seconds()
        self.queued_start = queued_seconds()
        self.first = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.last = dict(self.first)
        self.machine_start = _machine()
        self.wall = self.own = self.busy = self.iowait = self.queued = 0.0
        self.used: dict[str, float] = {}

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.last[name] = cpu_seconds(pid) or self.last[name]

    def stop(self) -> Meter:
        self.sample()
        self.wall = time.monotonic() - self.began
        self.own = cpu_seconds() - self.own_start
        self.queued = queued_seconds() - self.queued_start
        self.used = {name: self.last[name] - self.first[name] for name in self.pids}
        end = _machine()
        total = end[0] - self.machine_start[0]
        if total > 0:
            self.busy = (
                1 - (end[1] - self.machine_start[1] + end[2] - self.machine_start[2]) / total
            )
            self.iowait = (end[2] - self.machine_start[2]) / total
        return self

    def cores(self, *prefixes: str) -> float:
        """Cores used by this process (no prefix) or by the children named with a prefix."""
        if not prefixes:
            cpu = self.own
        else:
            cpu = sum(v for k, v in self.used.items() if k.startswith(prefixes))
        return cpu / self.wall if self.wall > 0 else 0.0

    def where(self, **groups: tuple[str, ...]) -> str:
        """'serve 0.81 core, services 0.12 core' for label -> child-name prefixes ((): us)."""
        return ", ".join(
            f"{label} {self.cores(*names):.2f} core" for label, names in groups.items()
        )

    def limit(self, main: float, *, waits_on: str, cap: float = 1.0) -> str:
        """Which limit a figure is near, given the cores its main process(es) used and the
        most they could use (`cap`: one per process, at most the machine's CPUs)."""
        if main >= 0.8 * cap:
            what = "one core" if cap <= 1 else f"{cap:.0f} cores"
            return f"CPU: {what} (Python; {main:.2f} core busy)"
        if self.busy >= 0.85:
            return (
                f"CPU: the machine ({self.busy:.0%} of {CPUS} cores busy, all processes; "
                f"this figure's process {main:.2f} core)"
            )
        if self.iowait >= 0.15:
            return f"disk ({self.iowait:.0%} iowait; {main:.2f} core busy)"
        return f"{waits_on} ({main:.2f} core busy, machine {self.busy:.0%})"
