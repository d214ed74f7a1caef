"""The relay of `serve` and `worker`: `order-saga relay` as a supervised child process, at a
lower CPU priority than the orders.

In the engine's own process the relay's deliveries (a signed POST and a confirmed publish
per event and destination) took the orders' event loop, GIL and writer thread: relay on
gave 27-53 % of the engine's throughput at 16 orders at once. As a child it has its own
interpreter, loop and database connection, and its lower priority (`os.nice(relay_nice)`,
as every `order-saga relay` takes) lets the scheduler serve the orders first when the
cores are busy (the relay catches up when they are not;
BENCHMARKS.md, "Order events").

The child gets the parent's settings as one JSON line on its stdin, which then stays open:
its end of file (the parent stopped, or died: kill -9 closes the pipe too) stops the child,
and on Linux the kernel also kills it with the parent (PR_SET_PDEATHSIG). A child that
exits on its own is started again. Stopping: stdin closed (the child cancels its pumps: a
delivery in flight is sent again after its lease, at least once), then SIGKILL after
`STOP_SECONDS`. Only the parent stops it: the child leads a session (and process group) of
its own, so a Ctrl-C at the terminal (SIGINT to the whole foreground group) reaches the
parent alone, which may still be giving requests their grace; it used to stop the child
too, and the supervisor started another meanwhile. Leading a session, the child lowers
its own scheduling group as well (`_lower_own_autogroup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fsm import metrics
from fsm.lifeline import die_with_parent
from fsm.relay import REFRESH_SECONDS
from fsm.settings import Settings
from fsm.store import Store
from fsm.subscriptions import destinations

log = logging.getLogger("order_saga.relay")
CHILD_FLAG = "--child"  # `order-saga relay --child`: settings on stdin, the parent's lifeline
STOP_SECONDS = 3.0  # then SIGKILL: what it had in flight is sent again after its lease
RESTART_SECONDS = 1.0


def child_argv() -> list[str]:
    return [sys.executable, "-m", "order_saga.cli", "relay", CHILD_FLAG]


async def supervise(settings: Settings, store: Store) -> None:
    """Keep one relay child running until cancelled; then stop it (never left behind).
    Started once there is something to deliver to: RabbitMQ configured, or a destination
    in `store` (a process with no destination starts no second interpreter)."""
    payload = settings.model_dump_json().encode() + b"\n"
    # The child counts its deliveries too, but reports them for this process to count: under
    # `serve --workers` it must not add its own to the sum of the workers' (fsm.metrics).
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    while settings.amqp_url is None:
        try:
            if await asyncio.to_thread(destinations, store):  # the read pool, not the writer
                break
        except Exception as exc:  # database away: keep looking, orders are unaffected
            log.warning("relay: cannot read destinations: %s", exc)
        await asyncio.sleep(REFRESH_SECONDS)
    while True:
        proc = await asyncio.create_subprocess_exec(
            *child_argv(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # out of the terminal's foreground group: see above
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(payload)
            await proc.stdin.drain()
            await _count(proc.stdout)  # until the child's stdout closes (it exits)
            code = await proc.wait()
        except BaseException:
            await _stop(proc)
            raise
        log.warning("relay process exited (%s); starting another", code)
        await asyncio.sleep(RESTART_SECONDS)


@contextlib.asynccontextmanager
async def running(settings: Settings, store: Store) -> AsyncIterator[None]:
    """The supervised relay child for the block (as `serve`'s lifespan and `worker` run it)."""
    task = asyncio.create_task(supervise(settings, store), name="relay")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _count(lines: asyncio.StreamReader) -> None:
    """The child's deliveries and failures, one JSON line per settled batch, into this
    process's counters (its /metrics is the one scraped)."""
    async for line in lines:
        with contextlib.suppress(ValueError, TypeError):
            name, delivered, failed = json.loads(line)
            metrics.outbox_delivered(str(name)).inc(int(delivered))
            metrics.outbox_failed(str(name)).inc(int(failed))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    if proc.stdin is not None:
        proc.stdin.close()  # end of file: the child stops its pumps and exits
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_SECONDS)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# -- in the child -------------------------------------------------------------------------


def read_parent_settings() -> Settings:
    """The parent's settings (the first line of stdin); then tie this process's life to
    the parent's."""
    settings = Settings.model_validate_json(sys.stdin.buffer.readline())
    die_with_parent(signal.SIGKILL)  # (a parent gone before: stdin's end of file stops us)
    return settings


def yield_to_orders(settings: Settings) -> None:
    """Every relay's priority: `relay_nice` below the process that started it (a relay
    already started niced, by systemd's `Nice=` say, goes that much lower again, at most
    to 19). Deliveries give the cores to the orders wherever the relay runs: beside a
    `serve` or `worker` (as their child, or started on its own), or alone (then nothing
    is waiting for the cores)."""
    os.nice(settings.relay_nice)
    _lower_own_autogroup(settings.relay_nice)


def _lower_own_autogroup(by: int) -> None:
    """Linux's autogroup scheduling (kernel.sched_autogroup_enabled, on by default in
    Debian's kernels) shares the CPU between sessions first and by nice value only inside
    a session: a relay leading a session of its own (a systemd unit, `setsid`, a
    supervisor's new session) competes with the orders' processes at full weight whatever
    its nice value. Such a relay (the child of `serve` and `worker` among them) lowers its
    session's group too (`/proc/self/autogroup`, `by` above where it was, at most 19). One
    that shares its session (started from a shell) leaves the group alone: it is also the
    shell's, and inside it the nice value already ranks the relay below the rest."""
    if os.getsid(0) != os.getpid():
        return
    path = Path("/proc/self/autogroup")  # "/autogroup-123 nice 0"
    try:
        now = int(path.read_text().split()[-1])
        path.write_text(str(min(19, now + by)))
    except (OSError, ValueError, IndexError):  # no autogroups here (another kernel, cgroups)
        return


def report(destination: str, delivered: int, failed: int) -> None:
    """A settled batch, told to the parent (read by `_count`)."""
    sys.stdout.write(json.dumps([destination, delivered, failed]) + "\n")
    sys.stdout.flush()


def on_parent_gone(stop: Callable[[], object]) -> None:
    """Call `stop` (thread-safe) once stdin reaches end of file: the parent is gone."""

    def watch() -> None:
        with contextlib.suppress(Exception):  # the raw descriptor: no buffer lock held
            while os.read(sys.stdin.fileno(), 65536):
                pass
        stop()

    threading.Thread(target=watch, name="relay-parent", daemon=True).start()
