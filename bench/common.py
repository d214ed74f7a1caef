"""What every benchmark shares: the run's settings, result rows, scratch databases, child
processes (always killed at the end), CPU accounting and the `orders` table.

Nothing here touches the engine's Python API (that is `bench.engine_api`): databases are
made with the migrations and filled through the SQLModel table definitions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy import Table, create_engine, func, make_url, select
from sqlmodel import SQLModel

import fsm.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from fsm.machine import is_terminal

# The seed's rich user buying the cheap widget: 1e9 cents buy 500,000 widgets at 19.99,
# and the widget's stock is 1,000,000, so every benchmark's orders all complete.
BUYER = {"user_id": 3, "product_id": 1, "quantity": 1}
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


@dataclass
class Config:
    """One run: scale (quick or full), where PostgreSQL is, where scratch files go."""

    tmp: Path
    quick: bool = False
    pg_server: str | None = DEFAULT_PG  # None: PostgreSQL figures are skipped
    pg_skip_reason: str = ""
    # Every scratch database this run made, dropped at the end even on failure.
    scratch: list[str] = field(default_factory=list)

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def databases(self) -> list[str]:
        return ["sqlite", "postgresql"] if self.pg_server else ["sqlite"]


@dataclass
class Row:
    """One line of the table."""

    what: str
    value: str
    reference: str = ""
    ratio: str = ""
    target: str = ""
    limit: str = ""


@dataclass
class Measured:
    """`count` orders done in `wall` seconds (of `planned`: fewer when a deadline came)."""

    count: int
    wall: float
    planned: int = 0
    errors: int = 0
    limit: str = ""  # which limit it is near (see bench.meter)
    cpu_seconds: float = 0.0  # user + sys of the process measured, where it was metered
    queued_seconds: float = 0.0  # its threads runnable, waiting for a core (where metered)

    @property
    def cpu_ms_per_order(self) -> float:
        return self.cpu_seconds * 1000 / self.count if self.count else float("nan")

    @property
    def per_second(self) -> float:
        return self.count / self.wall if self.wall > 0 else 0.0

    @property
    def partial(self) -> bool:
        return self.count < self.planned

    def note(self) -> str:
        """' (partial: 1,234 of 10,000 by the deadline)' or ''."""
        if not self.partial:
            return ""
        return f" (partial: {self.count:,} of {self.planned:,} by the deadline)"


def hide(url: str) -> str:
    """A database URL fit to print: never its password."""
    return make_url(url).render_as_string(hide_password=True)


def outcome(states: dict[str, int]) -> str:
    """'N completed', then any other final states with their counts."""
    others = {s: n for s, n in states.items() if s != "completed" and n}
    done = f"{states.get('completed', 0):,} completed"
    return done + (f", others {others}" if others else "")


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "-"


def ratio(value: float, reference: float, *, as_percent: bool = True) -> str:
    if reference <= 0:
        return "-"
    return f"{value / reference:.0%}" if as_percent else f"{value / reference:.2f}×"


# -- databases -------------------------------------------------------------------------------


def pg_admin_dsn(server: str) -> str:
    return server.replace("postgresql+psycopg://", "postgresql://") + "/test"


def pg_reachable(server: str) -> str:
    """'' when the server answers, else one line saying why not."""
    import psycopg

    try:
        with psycopg.connect(pg_admin_dsn(server), connect_timeout=5):
            return ""
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _pg_admin(server: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(pg_admin_dsn(server), autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


@contextlib.contextmanager
def scratch_database(cfg: Config, kind: str, purpose: str) -> Iterator[str]:
    """A fresh, empty database (no schema) for one measurement; removed afterwards."""
    if kind == "sqlite":
        path = cfg.tmp / f"{purpose}-{uuid.uuid4().hex[:6]}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    assert cfg.pg_server is not None
    name = f"order_saga_bench_{purpose}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _pg_admin(cfg.pg_server, f'CREATE DATABASE "{name}"')
    cfg.scratch.append(name)
    try:
        yield f"{cfg.pg_server}/{name}"
    finally:
        drop_scratch(cfg, name)


def drop_scratch(cfg: Config, name: str) -> None:
    if cfg.pg_server is None or name not in cfg.scratch:
        return
    with contextlib.suppress(Exception):  # best effort; reported names are in cfg.scratch
        _pg_admin(cfg.pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cfg.scratch.remove(name)


def orders_table() -> Table:
    return SQLModel.metadata.tables["orders"]


def insert_waiting_orders(url: str, count: int, *, age: float = 3600.0) -> None:
    """`count` orders in state pending, unleased, last moved `age` seconds ago: a backlog
    for workers, or stuck orders for the sweep. Inserted in batches, not through the API."""
    table = orders_table()
    then = datetime.now(UTC) - timedelta(seconds=age)
    base: dict[str, Any] = {
        **BUYER,
        "idempotency_key": None,
        "created_by": "",
        "amount": None,
        "state": "pending",
        "status": "pending",
        "payment_state": "pending",
        "inventory_state": "pending",
        "shipping_state": "pending",
        "shipping_address": None,
        "expected_delivery": None,
        "version": 0,
        "lease_owner": None,
        "lease_expires_at": None,
        "attempts": {},
        "last_error": None,
        "next_attempt_at": None,
        "deadline_at": None,
        "attention_reason": None,
        "cancel_requested": False,
        "created_at": then,
        "updated_at": then,
    }
    base = {k: v for k, v in base.items() if k in table.c}
    engine = create_engine(url)
    try:
        for start in range(0, count, 1000):
            rows = [{**base, "id": uuid.uuid4()} for _ in range(min(1000, count - start))]
            with engine.begin() as conn:
                conn.execute(table.insert(), rows)
    finally:
        engine.dispose()


class StateCounter:
    """Polls how many orders are in each state (one short query)."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.table = orders_table()

    def counts(self) -> dict[str, int]:
        query = select(self.table.c.state, func.count()).group_by(self.table.c.state)
        with self.engine.connect() as conn:
            return {state: int(n) for state, n in conn.execute(query).all()}

    def unfinished(self) -> int:
        return sum(n for state, n in self.counts().items() if not is_terminal(state))

    def close(self) -> None:
        self.engine.dispose()


def wait_terminal(counter: StateCounter, deadline: float, poll: float = 0.25) -> float:
    """Poll until no order is unfinished or the deadline (monotonic) passes; returns when."""
    while counter.unfinished() > 0 and time.monotonic() < deadline:
        time.sleep(poll)
    return time.monotonic()


# -- child processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def saga_env(database_url: str, services_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of an `order-saga` child: ours minus any ORDER_SAGA_* of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_SAGA_")}
    env["ORDER_SAGA_DATABASE_URL"] = database_url
    if services_url:
        for service in ("PRODUCT", "USER", "INVENTORY", "SHIPPING"):
            env[f"ORDER_SAGA_{service}_URL"] = services_url
    env.update(extra)
    return env


def saga_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "order_saga.cli", *args]


class Processes:
    """Children of this run, each in its own session; all of them are stopped on exit
    (SIGTERM, then SIGKILL after a grace period), whatever happened in between."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.children: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.cfg.tmp / f"{name}-{uuid.uuid4().hex[:6]}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            argv, env=env, cwd=self.cfg.tmp, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.children.append((proc, log))
        return proc

    def log_tail(self, proc: subprocess.Popen[bytes], lines: int = 5) -> str:
        for child, log in self.children:
            if child is proc:
                log.flush()
                text = Path(log.name).read_text(errors="replace").strip().splitlines()
                return " | ".join(text[-lines:])
        return ""

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the child's own session, made above
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)

    def stop_all(self) -> None:
        for proc, log in reversed(self.children):
            self.stop(proc)
            log.close()
        self.children.clear()


def wait_http(
    procs: Processes, proc: subprocess.Popen[bytes], url: str, timeout: float = 60.0
) -> None:
    """Poll `url` until it answers 200; fail with the child's last log lines if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}: {procs.log_tail(proc)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url}: not up after {timeout:.0f}s: {procs.log_tail(proc)}")


def start_services(
    procs: Processes, tree: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """The reference services alone (`order-saga services`), state in a fresh file; run
    from another checkout's code when `tree` is given (PYTHONPATH)."""
    port = free_port()
    state = procs.cfg.tmp / f"services-{port}.db"
    # No access log: the services stand in for other systems, whose logging is not ours
    # to count (the CPU they spend shares the machine with what is measured).
    argv = saga_argv("services", "--port", str(port), "--state", str(state), "--no-access-log")
    # The reference services admit 256 requests at once by default (503 beyond); 4 workers
    # at 32 orders each keep ~400 calls in flight, and the benchmark measures the engine,
    # not the reference services' admission limit.
    env = saga_env("sqlite:///unused.db", ORDER_SAGA_LIMIT_CONCURRENCY="4096")
    if tree is not None:
        env["PYTHONPATH"] = str(tree.resolve())
    proc = procs.start("services", argv, env)
    url = f"http://127.0.0.1:{port}"
    wait_http(procs, proc, f"{url}/products/1")
    return proc, url


@dataclass
class Served:
    """A `serve` process up and answering, with its own database and reference services."""

    procs: Processes
    url: str  # its database
    serve: subprocess.Popen[bytes]
    base: str  # http://127.0.0.1:PORT
    services: subprocess.Popen[bytes]
    services_url: str


@contextlib.contextmanager
def serving(
    cfg: Config,
    kind: str,
    purpose: str,
    *serve_args: str,
    prepare: Callable[[str, str], object] | None = None,
    **env: str,
) -> Iterator[Served]:
    """A fresh `kind` database, fresh reference services (`order-saga services`) and a
    fresh `serve --no-sweep *serve_args` in front of them (`env` added to its environment),
    answering /healthz; all of it stopped and dropped on the way out. `prepare(database
    URL, services URL)`, if given, runs before serve starts (a schema, rows, a webhook)."""
    with Processes(cfg) as procs, scratch_database(cfg, kind, purpose) as url:
        services, services_url = start_services(procs)
        if prepare is not None:
            prepare(url, services_url)
        port = free_port()
        argv = saga_argv("serve", "--port", str(port), "--no-sweep", *serve_args)
        serve = procs.start("serve", argv, saga_env(url, services_url, **env))
        base = f"http://127.0.0.1:{port}"
        wait_http(procs, serve, f"{base}/healthz")
        yield Served(procs, url, serve, base, services, services_url)


def abba(legs: int) -> list[int]:
    """Which of two arms (0, 1) runs each leg: 0 1 1 0 1 0 0 1 ... (the Thue-Morse order),
    so that a drift of the machine's load over the run, linear or curved, weighs on both
    arms alike; consecutive pairs (legs 2i, 2i+1) hold one leg of each."""
    return [bin(i).count("1") % 2 for i in range(legs)]


def migrate(procs: Processes, url: str, timeout: float = 120.0) -> None:
    """`order-saga db upgrade`, as an operator would make the database."""
    proc = procs.start("db-upgrade", saga_argv("db", "upgrade"), saga_env(url))
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise RuntimeError(f"db upgrade of {hide(url)} took over {timeout:.0f}s") from None
    if code != 0:
        raise RuntimeError(f"db upgrade of {hide(url)} failed: {procs.log_tail(proc)}")
