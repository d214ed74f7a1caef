"""`serve --workers N` pins each process to one CPU of those it may use, when there are at
least N of them (issue 20: two processes the scheduler moved between 2 cores spent
~1.3x the CPU per order of one; pinned ~1.1x, BENCHMARKS.md); `ORDER_SAGA_PIN_WORKERS=false`
leaves them to the scheduler. Read from /proc: what the kernel enforces, not what we meant.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.services import Downstream
from tests.support.serving import Served, fresh_database
from tests.support.settings import saga_env
from tests.support.waiting import wait_until

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs to pin 2 workers to")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _allowed(pid: int) -> set[int]:
    """The CPUs every thread of `pid` may run on (the union over its threads)."""
    allowed: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        allowed |= os.sched_getaffinity(int(task.name))
    return allowed


def _workers(served: Served) -> list[int]:
    pid = served.saga.process.pid
    return wait_until(
        lambda: (found := _children(pid)) and len(found) == 2 and found,
        30,
        what="serve's two workers",
        alive=served.saga.running,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_each_worker_runs_on_its_own_cpu(kind: str, tmp_path: Path, downstream: Downstream) -> None:
    with fresh_database(kind, str(tmp_path)) as url:
        env = saga_env(database_url=url, services_url=downstream.url)
        served = Served(env, "--workers", "2").wait_ready()
        try:
            pinned = [_allowed(pid) for pid in _workers(served)]
            parent = _allowed(served.saga.process.pid)
        finally:
            output = served.stop()
    assert [len(cpus) for cpus in pinned] == [1, 1], (pinned, output)
    assert pinned[0] != pinned[1], (pinned, output)
    assert pinned[0] | pinned[1] <= set(CPUS), (pinned, output)
    assert parent == set(CPUS), output  # the parent (and what it starts) is not pinned


@pytest.mark.slow
def test_workers_are_left_to_the_scheduler_when_told(
    tmp_path: Path, downstream: Downstream
) -> None:
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url, services_url=downstream.url, pin_workers=False)
        served = Served(env, "--workers", "2").wait_ready()
        try:
            allowed = [_allowed(pid) for pid in _workers(served)]
        finally:
            output = served.stop()
    assert allowed == [set(CPUS), set(CPUS)], (allowed, output)
