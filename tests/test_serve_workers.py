"""`serve --workers N`, read from /proc (what the kernel does, not what we meant).

Each worker listens on its own SO_REUSEPORT socket, so a burst of new connections spreads
over them (issue 20: on one shared socket the first worker to wake accepted nearly all of
them, 31/1, 32/0, 0/32). Each process is pinned to one CPU of those it may use, when
there are exactly N of them and no CPU quota below that (two processes the scheduler moved
between 2 cores spent ~1.3x the CPU per order of one; pinned ~1.1x, BENCHMARKS.md);
`ORDER_SAGA_PIN_WORKERS=false` leaves them to the scheduler. A worker gone unasked stops
the others and fails serve; a parent killed outright takes its workers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest
from yarl import URL

from bench.meter import children, connections, listening
from downstream.app import create_services_app
from order_saga.cli import embedded_services_url
from order_saga.server import pinned_cpus, port_guard
from tests.support.processes import run_saga
from tests.support.services import Downstream, free_port
from tests.support.serving import Served, fresh_database
from tests.support.settings import saga_env
from tests.support.waiting import POLL, wait_until

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
BURST = 32  # keep-alive connections opened at once (bench/http_workers.py's clients)

two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs to pin 2 workers to")
linux = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreads on Linux")


def _allowed(pid: int) -> set[int]:
    """The CPUs every thread of `pid` may run on (the union over its threads)."""
    allowed: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        allowed |= os.sched_getaffinity(int(task.name))
    return allowed


def _workers(served: Served, interval: float = POLL) -> list[int]:
    pid = served.saga.process.pid
    return wait_until(
        lambda: (found := sorted(children(pid))) and len(found) == 2 and found,
        30,
        what="serve's two workers",
        alive=served.saga.running,
        interval=interval,
    )


async def _split(port: int, workers: list[int]) -> list[int]:
    """Connections per worker once `BURST` keep-alive connections, opened at once, have
    each been answered once (and are still open)."""

    async def keep_alive() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        return writer

    opened = await asyncio.gather(*(keep_alive() for _ in range(BURST)))
    try:
        return wait_until(
            lambda: sum(split := connections(port, workers)) == BURST and split,
            10,
            what=f"the workers to hold the {BURST} connections",
        )
    finally:
        for writer in opened:
            writer.close()


@pytest.mark.slow
@linux
def test_each_worker_listens_on_its_own_socket_and_a_burst_spreads_over_them(
    tmp_path: Path, downstream: Downstream
) -> None:
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url, services_url=downstream.url, keepalive_timeout=60)
        served = Served(env, "--workers", "2").wait_ready()
        try:
            workers = _workers(served)
            sockets = listening(served.port, workers)
            split = asyncio.run(_split(served.port, workers))
        finally:
            output = served.stop()
    assert min(split) >= 4, (split, output)  # even: 16/16 ± 2.8; below 4: p = 3e-6
    assert [len(own) for own in sockets] == [1, 1], (sockets, output)
    assert sockets[0] != sockets[1], (sockets, output)


@pytest.mark.slow
def test_a_port_in_use_stops_serve_workers_before_they_start(
    tmp_path: Path, downstream: Downstream
) -> None:
    """Even when the port is held by another `serve --workers` (whose SO_REUSEPORT group
    would otherwise take the second one in, to share its connections)."""
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url, services_url=downstream.url)
        served = Served(env, "--workers", "2").wait_ready()
        try:
            args = ("--port", str(served.port), "--no-sweep", "--workers", "2")
            second = run_saga("serve", *args, env=env, timeout=30)
        finally:
            output = served.stop()
    assert second.returncode == 1, second.explain()
    assert second.stderr == "order-saga: OSError: [Errno 98] Address already in use\n", (
        second.explain()
    )
    assert "Traceback" not in output, output  # the first one served on, undisturbed


@pytest.mark.parametrize(
    ("host", "error"),
    [
        ("127.0.0.1", "OSError: [Errno 98] Address already in use"),  # the port held below
        ("nonexistent.invalid", "gaierror: [Errno -2] Name or service not known"),
    ],
)
def test_serve_that_cannot_listen_stops_in_one_line_before_it_starts(
    host: str, error: str, tmp_path: Path
) -> None:
    """One process, as `--workers N` does: the socket is bound first, so nothing was
    migrated or started (before: the whole app started, then failed in log lines, exit 3)."""
    held = socket.create_server(("127.0.0.1", 0))
    port = held.getsockname()[1]
    try:
        with fresh_database("sqlite", str(tmp_path)) as url:
            env = saga_env(database_url=url)
            args = ("--host", host, "--port", str(port), "--no-sweep")
            result = run_saga("serve", *args, env=env, timeout=60)
    finally:
        held.close()
    assert result.returncode == 1, result.explain()
    assert result.stderr == f"order-saga: {error}\n", result.explain()
    assert not (tmp_path / "saga.db").exists(), "serve migrated before it could listen"


def test_serve_refuses_connections_until_it_serves(tmp_path: Path) -> None:
    """Bound first (a port in use is one line), but listening only once it serves: while
    its migration waits for a lock, a client (a load balancer's TCP check) is refused,
    not accepted and left hanging through the migration."""
    import psycopg

    from fsm.migrate import upgrade

    with fresh_database("postgresql", str(tmp_path)) as url:
        upgrade(url, "0010")  # 0011 rewrites `orders`: it waits for the reader below
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as holder:
            holder.execute("SELECT count(*) FROM orders")  # a transaction left open on it
            served = Served(saga_env(database_url=url))
            try:

                def accepts() -> bool:
                    try:
                        socket.create_connection(("127.0.0.1", served.port), 0.5).close()
                    except OSError:
                        return False
                    return True

                # Its migration waits up to 5 s for the lock: 3 s of it, nobody let in.
                with pytest.raises(AssertionError, match="timed out"):
                    wait_until(accepts, 3.0, what="a connection", alive=served.saga.running)
                holder.rollback()  # the migration goes on; serve starts and answers
                served.wait_ready()
            finally:
                served.stop()


def test_a_worker_that_cannot_start_for_its_environment_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    """As `serve` with one process does: `order-saga: <error>`, no traceback per worker
    (35 lines, two tracebacks, for a services file that cannot be opened)."""
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url, services_db=str(tmp_path / "no" / "such" / "svc.db"))
        args = ("--port", str(free_port()), "--no-sweep", "--workers", "2")
        result = run_saga("serve", *args, env=env, timeout=60)
    assert result.returncode == 1, result.explain()
    assert "Traceback" not in result.stderr, result.explain()
    lines = result.stderr.splitlines()
    failed = "order-saga: OperationalError: unable to open database file"
    assert failed in lines, result.explain()
    # The start line (what it runs with) comes first, once the port is bound.
    assert "order_saga.start" in lines[0], result.explain()
    stopped = [line for line in lines[1:] if line != failed]
    assert all(re.fullmatch(r"serve: worker \d+ exited with 1; stopping the others", line)
               for line in stopped), result.explain()  # fmt: skip


@pytest.mark.skipif(sys.platform != "linux", reason="the guard is Linux's abstract sockets")
def test_a_serve_workers_starting_on_the_same_port_at_once_is_refused(tmp_path: Path) -> None:
    """Two `serve --workers` on one port in the same instant would both pass the port's
    probe and then share one SO_REUSEPORT group: the second finds the first's guard (held
    here, as a first one that has just probed would hold it) and stops in one line."""
    port = free_port()
    guard = port_guard("127.0.0.1", port)
    try:
        with fresh_database("sqlite", str(tmp_path)) as url:
            env = saga_env(database_url=url)
            args = ("--port", str(port), "--no-sweep", "--workers", "2")
            second = run_saga("serve", *args, env=env, timeout=30)
    finally:
        assert guard is not None
        guard.close()
    assert second.returncode == 1, second.explain()
    assert second.stderr == "order-saga: OSError: [Errno 98] Address already in use\n", (
        second.explain()
    )
    again = port_guard("127.0.0.1", port)  # released with its holder
    assert again is not None
    again.close()


@pytest.mark.slow
def test_a_stop_during_start_up_stops_every_worker(tmp_path: Path, downstream: Downstream) -> None:
    """SIGTERM as soon as both workers exist, while they still build their apps (before
    uvicorn handles SIGTERM itself): each finishes starting, then stops; none serves on."""
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url, services_url=downstream.url)
        served = Served(env, "--workers", "2")
        workers = _workers(served, interval=0.002)
        try:
            result = served.saga.stop()
        finally:
            for pid in workers:  # a worker that ignored the stop outlives its killed parent
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.explain()
    assert "Traceback" not in result.stderr, result.explain()


@pytest.mark.slow
@two_cpus
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
@two_cpus
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


def _gone(pid: int) -> bool:
    """Exited: no /proc entry, or a zombie its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_a_parent_killed_outright_takes_its_workers_with_it(
    tmp_path: Path, downstream: Downstream
) -> None:
    """kill -9 of `serve --workers 2`'s parent: each worker gets SIGTERM from the kernel
    and stops, rather than serve on orphaned holding the port against the next serve."""
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url, services_url=downstream.url)
        served = Served(env, "--workers", "2").wait_ready()
        workers = _workers(served)
        try:
            served.saga.process.kill()
            wait_until(lambda: all(_gone(pid) for pid in workers), 30, what="the workers gone")
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            served.saga.wait()
        again = Served(env, "--workers", "2", port=served.port).wait_ready()
        assert again.stop() is not None  # the port was free for the next serve


@pytest.mark.slow
def test_a_worker_stopped_on_its_own_stops_serve_with_a_failure(
    tmp_path: Path, downstream: Downstream
) -> None:
    """One worker gone unasked (here SIGTERM to it alone, which it takes as a clean stop):
    the others are stopped, the parent says which worker went and how, and exits non-zero
    so that a supervisor restarting on failure restarts the unit."""
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url, services_url=downstream.url)
        served = Served(env, "--workers", "2").wait_ready()
        workers = _workers(served)
        os.kill(workers[0], signal.SIGTERM)
        result = served.saga.wait(30)
    assert result.returncode == 1, result.explain()
    assert f"serve: worker {workers[0]} exited with 0; stopping the others" in result.stderr
    assert all(_gone(pid) for pid in workers), result.explain()


@pytest.mark.parametrize(
    ("workers", "cpus", "quota", "pinned"),
    [
        (2, [0, 1], None, [0, 1]),  # the whole machine, two workers: one each
        (4, [2, 3, 5, 7], 4.0, [2, 3, 5, 7]),  # a cpuset of its own, quota to match
        (2, [0, 1, 2, 3], None, None),  # fewer workers than CPUs: another may run beside
        (2, list(range(16)), 2.0, None),  # docker --cpus 2 on 16 cores: the host's affinity
        (2, [0, 1], 1.5, None),  # a quota below the CPUs it may run on
        (1, [0], None, None),  # one process: nothing to place
        (3, [0, 1], None, None),  # more workers than CPUs
    ],
)
def test_workers_are_pinned_only_to_cpus_the_instance_has_to_itself(
    workers: int, cpus: list[int], quota: float | None, pinned: list[int] | None
) -> None:
    assert pinned_cpus(workers, cpus, quota) == pinned


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000/services"),
        ("0.0.0.0", "http://127.0.0.1:8000/services"),
        ("::", "http://127.0.0.1:8000/services"),
        ("::1", "http://[::1]:8000/services"),
        ("localhost", "http://localhost:8000/services"),
    ],
)
def test_the_embedded_services_url_is_one_a_client_can_use(host: str, url: str) -> None:
    assert embedded_services_url(host, 8000) == url
    assert URL(url).port == 8000  # an IPv6 literal unbracketed is not a URL (yarl refuses)


def test_the_fault_routes_say_the_board_is_each_process_s_own() -> None:
    """The embedded services share their SQLite state over the workers, not the fault
    board: a reader of /docs must not assume a fault reaches every worker (one POST under
    `--workers 2` showed in half the GETs)."""
    services = create_services_app()
    try:
        paths = services.openapi()["paths"]
    finally:
        services.state.store.close()
    for method in ("post", "get", "delete"):
        description = paths["/_faults"][method]["description"]
        assert "each worker has its own" in description, (method, description)
        assert "`order-saga services` in its own process" in description, (method, description)
