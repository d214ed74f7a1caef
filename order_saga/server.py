"""How `serve` and `services` run uvicorn: limits and timeouts from Settings.

uvicorn bounds idle keep-alive connections and, with `limit_concurrency`, the number of
connections and requests at once (503 beyond), but it has no deadline for a request's
headers: a client sending one byte every few seconds keeps a connection forever
(slowloris). `HeaderDeadline` adds one; bodies get theirs in `api.guard.BodyGuard`.

`DrainingServer`: uvicorn's server telling the app when shutdown begins, before the grace.
`serve_processes`: `serve --workers N`, N processes on one port, each a whole engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fsm.lifeline import die_with_parent
from fsm.settings import Settings
from fsm.text import masked
from order_saga.console import environment_errors, one_line
from order_saga.metrics_dir import shared_metrics


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol (a C parser: much less CPU per request than h11),
    closing a connection whose next request's headers are not complete
    `header_timeout` seconds after the connection opened or the previous answer ended.
    Unlike the keep-alive timer, trickling bytes does not reset it."""

    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _expire(self) -> None:
        self._deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._waiting_for_headers():  # a whole request arrived: it is being served
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_headers():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which tells the app that shutdown has begun (SIGTERM, Ctrl-C)
    before it gives the requests in flight `timeout_graceful_shutdown` seconds: an app
    with `state.stop_starting` (api.app) then stops picking up new work (its sweep), where
    the lifespan's shutdown comes only once the grace is over. The one server `serve`
    runs, in one process and in each of `--workers`."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stop_starting = getattr(getattr(self.config.app, "state", None), "stop_starting", None)
        if stop_starting is not None:
            stop_starting()
        await super().shutdown(sockets)


def protocol(header_timeout: float) -> type[HeaderDeadline]:
    return type("HeaderDeadlineProtocol", (HeaderDeadline,), {"header_timeout": header_timeout})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config`."""
    return {
        "http": protocol(settings.header_timeout),
        "timeout_keep_alive": settings.keepalive_timeout,
        "limit_concurrency": settings.limit_concurrency,
        # SIGTERM: the sweep stops at once (DrainingServer); in-flight requests (and the runs
        # they wait for) get this long, then the lifespan's shutdown cancels the remaining
        # runs, which release their leases.
        "timeout_graceful_shutdown": settings.shutdown_grace,
    }


def listeners(host: str, port: int, count: int, *, listen: bool = True) -> list[socket.socket]:
    """Listening sockets on host:port for `count` workers: on Linux one each, bound with
    SO_REUSEPORT (the kernel hashes each connection to one of them); elsewhere one shared
    (other kernels' SO_REUSEPORT does not spread connections). A port in use raises
    OSError here, before any fork: a probe without SO_REUSEPORT is bound first, because
    another SO_REUSEPORT group on the port (a second `serve --workers`) would otherwise
    take ours in and share its connections. `listen=False`: bound only; the server
    listens on it once it serves (a client is refused, not left waiting, meanwhile)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def bound(reuse_port: bool) -> socket.socket:
        sock = socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    probe = bound(reuse_port=False)
    if count > 1 and sys.platform == "linux":
        probe.close()
        socks = [bound(reuse_port=True) for _ in range(count)]
    else:
        socks = [probe]
    for sock in socks if listen else ():
        sock.listen(2048)
    return socks


_STOPS = {signal.SIGTERM, signal.SIGINT}


def port_guard(host: str, port: int) -> socket.socket | None:
    """Linux: a name in the abstract socket namespace for host:port, held while a
    `serve --workers` runs there (its kernel releases it with the process, kill -9
    included). `listeners` probes the port, closes the probe, then binds with
    SO_REUSEPORT: two such starts in that instant would each pass the probe and share
    one group. The second now fails here, before it probes: OSError, address in use."""
    if sys.platform != "linux":
        return None
    guard = socket.socket(socket.AF_UNIX)
    try:
        guard.bind(f"\0order-saga serve --workers {host} {port}")
    except OSError:
        guard.close()
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from None
    return guard


def _worker(
    make_app: Callable[[], Any],
    sock: socket.socket,
    options: dict[str, Any],
    before_serving: Callable[[], None],
    cpu: int | None,
    parent: int,
) -> NoReturn:
    """One forked child of `serve_processes`: serves `sock` until stopped, then leaves
    with `os._exit` (never through the parent's cleanup).

    uvicorn handles SIGTERM/SIGINT only once it serves. One that comes earlier, while the
    app is being built, marks the server to stop as soon as it has started (ignored, it
    would leave this worker serving on alone). After a graceful stop uvicorn re-raises
    the signal it stopped on: by then that only marks a finished server, a clean exit.
    A start that fails for the environment (an unreachable database, an unwritable file:
    `environment_errors`) is reported in one line, as the CLI reports it with one process;
    anything else with its traceback (a bug)."""
    from order_saga.logs import flush

    server: list[uvicorn.Server] = []
    asked: list[int] = []

    def stop_once_started(sig: int, _: object) -> None:
        asked.append(sig)
        for started in server:
            started.should_exit = True

    signal.signal(signal.SIGTERM, stop_once_started)
    signal.signal(signal.SIGINT, stop_once_started)
    # The parent gone (kill -9 included): stop as if it had asked, not serve on orphaned,
    # holding the port against the next `serve`.
    die_with_parent(signal.SIGTERM, parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked since before the fork
    code = 1
    try:
        if cpu is not None:  # refused (a sandbox): run unpinned rather than not at all
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {cpu})
        before_serving()
        server.append(DrainingServer(uvicorn.Config(make_app(), log_config=None, **options)))
        server[0].should_exit = bool(asked)
        server[0].run(sockets=[sock])
        code = 0
    except BaseException as exc:  # report, then leave
        if isinstance(exc, environment_errors()):  # one line, as the CLI says it (main)
            print(f"order-saga: {masked(one_line(exc))}", file=sys.stderr)
        else:  # a bug: its traceback
            traceback.print_exc()
    finally:
        flush()  # the queued log lines (os._exit skips atexit)
        sys.stderr.flush()
        os._exit(code)


def serve_processes(
    make_app: Callable[[], Any],
    *,
    host: str,
    port: int,
    workers: int,
    options: dict[str, Any],
    before_serving: Callable[[], None] = lambda: None,
    pin: bool = True,
    bound: Callable[[], None] = lambda: None,
) -> int:
    """`workers` processes serving one port, on Linux each on its own listening socket
    (`listeners`: bound here, before the fork; each child closes the others' and the
    parent all of them). On one shared socket every idle worker races to accept, and the
    one that wins takes the whole burst (32 new connections fell 31/1, 32/0, 0/32:
    BENCHMARKS.md, issue 20); per-worker sockets let the kernel hash connections evenly.
    The cost: connections queued on a worker's socket when it exits are reset rather than
    taken by another, which is moot here since one worker's exit stops them all.

    `bound` is called in the parent once the sockets are bound, before the fork (a port in
    use raises first). Each child calls `before_serving` and `make_app` after the fork, so
    each has its own engine, writer thread, connection pool and sweeper; none of those exist
    in the parent, which only forwards SIGTERM/SIGINT (as SIGTERM: each child shuts down
    gracefully) and waits. When one child exits, the others are stopped too; one that exits
    unasked makes the exit code non-zero and is named on stderr. A parent killed outright
    takes its children with it (each gets SIGTERM from the kernel). Returns the exit code
    (0: all stopped cleanly when asked). POSIX only (fork).

    With `pin` and as many processes as the CPUs this one may run on (`pinned_cpus`), each
    child is pinned to one of them (its threads inherit it): the scheduler otherwise moves the
    event loop, writer and log threads of the busy processes between the cores, and two
    processes on 2 cores spent ~1.2-1.5x the CPU per order of one (BENCHMARKS.md, issue
    20). The parent, the database and everything else still run anywhere.

    The parent holds `port_guard` while it runs: a second `serve --workers` on the same
    host and port fails at once, even one that starts in the same instant."""
    guard = port_guard(host, port)  # held by this parent only, until it returns
    try:
        with shared_metrics(workers):
            return _serve_processes(
                make_app, host, port, workers, options, before_serving, pin, guard, bound
            )
    finally:
        if guard is not None:
            guard.close()


def _serve_processes(
    make_app: Callable[[], Any],
    host: str,
    port: int,
    workers: int,
    options: dict[str, Any],
    before_serving: Callable[[], None],
    pin: bool,
    guard: socket.socket | None,
    bound: Callable[[], None],
) -> int:
    from order_saga.logs import flush

    socks = listeners(host, port, workers)
    bound()  # the port is ours: the caller may say it starts (a port in use said nothing)
    alive: set[int] = set()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = pinned_cpus(workers, cpus, cpu_quota()) if pin else None
    parent = os.getpid()
    stopping = False

    def terminate() -> None:
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    def stop(*_: object) -> None:  # asked to (SIGTERM, SIGINT)
        nonlocal stopping
        stopping = True
        terminate()

    # No thread of ours crosses the fork: the log writer's (every command has one) could
    # hold its stream's lock at that instant, and a child would start with it held. The
    # parent logs nothing more (what it has to say goes to stderr below).
    flush()

    # A stop that comes while the workers are forked waits (blocked) until the parent's
    # and each child's handler is in place: the default action would kill the parent and
    # leave the children serving, or kill a child the parent then reports as failed.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        for index in range(workers):
            pid = os.fork()
            if pid == 0:  # the child: its own loop, engine and threads from here on
                if guard is not None:
                    guard.close()  # the parent's: a worker left behind must not hold it
                own = socks[index % len(socks)]
                for other in socks:
                    if other is not own:  # held open here, it would outlive its worker
                        other.close()
                cpu = pinned[index] if pinned else None
                _worker(make_app, own, options, before_serving, cpu, parent)
            alive.add(pid)
        for sock in socks:
            sock.close()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    except BaseException:
        stop()  # a fork failed: the workers already started go too
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    worst = 0
    while alive:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        alive.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        failed = code if code > 0 else 0 if code == 0 else 128 - code
        if not stopping:  # not asked to stop: a worker failed, or was stopped on its own
            how = f"exited with {code}" if code >= 0 else f"was killed by signal {-code}"
            print(f"serve: worker {pid} {how}; stopping the others", file=sys.stderr, flush=True)
            failed = failed or 1  # a supervisor restarting on failure restarts the unit
            stopping = True
        worst = worst or failed
        terminate()  # one gone: the others follow (a supervisor restarts the whole unit)
    return worst


def pinned_cpus(workers: int, cpus: list[int], quota: float | None) -> list[int] | None:
    """The CPU each of `workers` processes is pinned to, or None (left to the scheduler).

    Only when there are exactly as many workers as CPUs this process may run on, and no
    CPU quota (`quota`, in CPUs) holds it to fewer: then this instance has those CPUs to
    itself. A container's affinity often lists every CPU of the host (`docker --cpus`, a
    Kubernetes pod without the static CPU manager), and with fewer workers than CPUs
    another instance may run beside: pinning there would put every instance's workers on
    the same first CPUs and leave the others idle."""
    if workers < 2 or workers != len(cpus):
        return None
    if quota is not None and quota < len(cpus):
        return None
    return cpus


def cpu_quota() -> float | None:
    """The CPU bandwidth quota of this process's cgroup, in CPUs (cgroup v2 `cpu.max`, or
    v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited or unreadable."""
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):
        try:
            limit_us = int(Path(v1, "cpu.cfs_quota_us").read_text())
            period_us = int(Path(v1, "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if limit_us <= 0 or period_us <= 0 else limit_us / period_us
    return None
