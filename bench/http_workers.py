"""`serve --workers 2` against one `serve` process over HTTP on PostgreSQL (issue 20: serve's
CPU per completed order must be within 10 % of one process's).

Both are up side by side for the whole phase, each with its own fresh database and reference
services (`order-saga services`), `--no-sweep`, both warmed up; then legs of 32 closed-loop
clients go to one or the other in the Thue-Morse order (1 2 2 1 2 1 1 2 ...), so that the
machine's drift weighs on both alike. Each leg is a fresh set of keep-alive connections, so
the kernel splits them among the workers anew.

What is summed, per leg: user + sys from /proc of every process of the tree that `serve`
heads, found at the leg's start (with `--workers 2` the parent, which only waits, and both
workers; any child of theirs, e.g. a relay child, likewise; threads are inside their
process). The one-process leg counts the same: `serve` and any child of it. The row names
the processes counted and the parent's share.

The figure: CPU per order of each arm over all its legs (its CPU summed ÷ its orders), their
ratio, and beside it the ratio of each consecutive pair of legs (one of each arm): median and
range, which is the spread to read against the 10 % band. Per leg of `--workers 2`, how the 32
connections fell on the workers (from /proc/net/tcp and the workers' file descriptors,
sampled mid-leg). Also on-CPU slices per order (/proc/PID/task/*/schedstat: how often the
processes were scheduled in) and the transactions PostgreSQL committed per order
(pg_stat_database): group commit shares one commit among the orders one process has in
flight, and two processes each batch fewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Config, Row, Served, abba, pg_admin_dsn, serving
from bench.http_load import Load, load
from bench.meter import Meter, children, connections

CLIENTS = 32


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo.extend(children(p))
    return found


def slices(pid: int) -> int:
    """Times the threads of `pid` were scheduled onto a CPU (0 if unreadable)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(task.read_text().split()[2])
    return total


@dataclass
class Leg:
    index: int  # its place in the run
    which: int  # its arm (0, 1)
    load: Load
    cpu: dict[int, float]  # seconds per process of the tree (parent first)
    slices: int
    split: list[int]  # connections per worker (one process: [32])

    @property
    def orders(self) -> int:
        return len(self.load.latencies)

    @property
    def cpu_ms(self) -> float:
        return sum(self.cpu.values()) * 1000 / self.orders if self.orders else float("nan")


@dataclass
class Arm:
    name: str
    up: Served
    legs: list[Leg] = field(default_factory=list)
    commits: int = 0
    commits_at: int | None = None
    meter: Meter | None = None

    @property
    def port(self) -> int:
        return int(self.up.base.rsplit(":", 1)[1])

    def orders(self) -> int:
        return sum(leg.orders for leg in self.legs)

    def cpu_ms(self) -> float:
        cpu = sum(sum(leg.cpu.values()) for leg in self.legs)
        return cpu * 1000 / self.orders() if self.orders() else float("nan")

    def per_second(self) -> float:
        wall = sum(leg.load.wall for leg in self.legs)
        return self.orders() / wall if wall else 0.0

    def latency(self, p: int) -> float:
        merged = Load(latencies=[x for leg in self.legs for x in leg.load.latencies])
        return merged.ms(p)

    def slices_per_order(self) -> float:
        return sum(leg.slices for leg in self.legs) / self.orders() if self.orders() else 0.0

    def commits_per_order(self) -> float:
        return self.commits / self.orders() if self.orders() else float("nan")

    def errors(self) -> int:
        return sum(sum(leg.load.failures.values()) for leg in self.legs)

    def processes(self) -> str:
        counts = {len(leg.cpu) for leg in self.legs}
        parent = sum(leg.cpu[next(iter(leg.cpu))] for leg in self.legs)
        total = sum(sum(leg.cpu.values()) for leg in self.legs)
        share = f"{parent / total:.0%}" if total else "-"
        return f"{'/'.join(map(str, sorted(counts)))} processes (first's share {share})"

    def shown(self) -> str:
        reps = ", ".join(f"{leg.cpu_ms:.2f}" for leg in self.legs)
        return (
            f"{self.per_second():,.0f} orders/s; p50 {self.latency(50):,.0f} ms, p99 "
            f"{self.latency(99):,.0f} ms; {self.cpu_ms():.2f} ms CPU/order (legs: {reps}); "
            f"{self.slices_per_order():.1f} on-CPU slices/order; {self.processes()}"
        )


def xact_commits(cfg: Config, url: str) -> int | None:
    """Transactions committed so far in the PostgreSQL database of `url`."""
    if not url.startswith("postgresql") or cfg.pg_server is None:
        return None
    import psycopg

    query = "SELECT xact_commit FROM pg_stat_database WHERE datname = %s"
    with psycopg.connect(pg_admin_dsn(cfg.pg_server), connect_timeout=5) as conn:
        row = conn.execute(query, (url.rsplit("/", 1)[1],)).fetchone()
    return int(row[0]) if row else None


def count_commits(cfg: Config, arm: Arm) -> None:
    """Add what `arm`'s database committed since the last look (PostgreSQL publishes a
    backend's counters up to a second late: the tail of a leg lands in the next window of
    the same arm, or in the final look after a pause; the total is exact)."""
    now = xact_commits(cfg, arm.up.url)
    if now is not None and arm.commits_at is not None:
        arm.commits += now - arm.commits_at
    arm.commits_at = now


def leg(arm: Arm, index: int, which: int, seconds: float, clients: int) -> Leg:
    pids = tree(arm.up.serve.pid)
    workers = pids[1:] or pids
    split: list[int] = []

    def sample() -> None:
        split.extend(connections(arm.port, workers))

    timer = threading.Timer(seconds / 2, sample)
    meter = Meter(**{f"server{i}": p for i, p in enumerate(pids)}, services=arm.up.services.pid)
    before = {p: slices(p) for p in pids}
    timer.start()
    result = asyncio.run(load(arm.up.base, clients, seconds))
    timer.join()
    meter.stop()
    arm.meter = meter
    used = {p: meter.used[f"server{i}"] for i, p in enumerate(pids)}
    switched = sum(slices(p) - before[p] for p in pids)
    return Leg(index, which, result, used, switched, split)


@contextlib.contextmanager
def side_by_side(cfg: Config, *arms: tuple[str, tuple[str, ...]]) -> Iterator[list[Arm]]:
    with contextlib.ExitStack() as stack:
        up = [
            Arm(name, stack.enter_context(serving(cfg, "postgresql", "workers", *args)))
            for name, args in arms
        ]
        for arm in up:  # connections, pools and caches of every process
            asyncio.run(load(arm.up.base, CLIENTS, 2.0))
        yield up


def alternate(
    cfg: Config, arms: list[Arm], legs: int, seconds: float, clients: tuple[int, ...]
) -> None:
    """`legs` legs in the Thue-Morse order over two arms (`clients[i]` for arm i)."""
    for arm in arms:
        count_commits(cfg, arm)
    for index, which in enumerate(abba(legs)):
        arm = arms[which]
        count_commits(cfg, arm)
        arm.legs.append(leg(arm, index, which, seconds, clients[which]))
    time.sleep(1.1)  # PostgreSQL's counters of the last second
    for arm in arms:
        count_commits(cfg, arm)


def pair_ratios(arms: list[Arm], legs: int) -> list[float]:
    """CPU/order of arm 1 ÷ arm 0 in each consecutive pair of legs (2i, 2i+1)."""
    by_index = {leg.index: leg for arm in arms for leg in arm.legs}
    ratios = []
    for i in range(0, legs - 1, 2):
        one, two = sorted((by_index[i], by_index[i + 1]), key=lambda leg: leg.which)
        ratios.append(two.cpu_ms / one.cpu_ms)
    return ratios


def run(cfg: Config) -> list[Row]:
    if "postgresql" not in cfg.databases():
        return [Row("`serve --workers 2` over HTTP (PostgreSQL)", f"skipped: {cfg.pg_skip_reason}")]
    seconds, legs = cfg.seconds(7, 3), cfg.n(12, 4)
    with side_by_side(cfg, ("one process", ()), ("--workers 2", ("--workers", "2"))) as arms:
        alternate(cfg, arms, legs, seconds, (CLIENTS, CLIENTS))
    one, two = arms
    pairs = pair_ratios(arms, legs)
    splits = " ".join("/".join(map(str, leg.split)) for leg in two.legs)
    last = two.meter
    assert last is not None
    return [
        Row(
            what=f"`serve --workers 2 --no-sweep`, postgresql, {CLIENTS} clients, {legs} legs of "
            f"{seconds:.0f} s alternating with one process, both up side by side "
            f"({one.errors() + two.errors()} errors)",
            value=f"{two.shown()}; connections per worker, by leg: {splits}",
            reference=f"one process: {one.shown()}",
            ratio=f"CPU/order {two.cpu_ms() / one.cpu_ms():.2f}× (pairs of legs: median "
            f"{statistics.median(pairs):.2f}×, range {min(pairs):.2f}–{max(pairs):.2f}×); "
            f"orders/s {two.per_second() / one.per_second():.2f}×; on-CPU slices/order "
            f"{two.slices_per_order() / one.slices_per_order():.2f}×; PostgreSQL "
            f"commits/order {one.commits_per_order():.2f} → {two.commits_per_order():.2f}"
            if one.cpu_ms() > 0 and one.per_second() > 0 and pairs
            else "-",
            target="CPU/order within 10% of one process (≤ 1.10×)",
            limit=last.limit(last.cores("server"), waits_on="commit latency / services", cap=2.0)
            + "; "
            + last.where(serve=("server",), services=("services",), generator=()),
        )
    ]
