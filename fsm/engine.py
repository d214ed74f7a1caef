"""Connections to the engine's database: SQLAlchemy's read pool (`make_engine`) and the
commit thread's own DBAPI connection (`backend`), each with the same bounded waits.

SQLite's pragmas, PostgreSQL's lock/statement timeouts and its bounds on the network
(`pg_link`: keepalives, tcp_user_timeout) are decided here, once, for both kinds of
connection (their statement texts are `fsm.sql`'s). No statements of the engine's
own, no decisions about orders.
"""

from __future__ import annotations

import sqlite3
import weakref
from typing import Any

from sqlalchemy import Engine, create_engine, event

from fsm import sql
from fsm.committer import Backend
from fsm.errors import store_unavailable

__all__ = ["backend", "make_engine", "migration_engine", "pg_link", "pg_options"]


# How long a group-commit batch waits for a row lock another session holds before the op
# moves to the side lane (fsm.committer): long enough for the brief locks of another
# process's batch or sweep, short enough that the rest of the batch barely notices.
BATCH_LOCK_TIMEOUT = 0.1
# A migration has no statement time limit (revision 0007 copies the whole log in one
# INSERT … SELECT; a state migration rewrites every order row in the old state: on a big
# database either ran past the engine's 30 s and rolled back, with no way to raise it). Its
# wait for a lock stays short: while a revision waits for a table's exclusive lock, every
# other statement on that table queues behind it, so the release still serving during a
# rolling deploy would fail for as long as the wait (a minute here failed every read of
# `orders` for that minute). Past it the upgrade fails, leaving the database at the
# revision it was (one transaction), and can be run again.
MIGRATION_LOCK_TIMEOUT = 5.0


def pg_options(*, lock_timeout: float, statement_timeout: float) -> str:
    """PostgreSQL's per-connection bounded waits, as libpq `options`; and the session's
    settings the engine is written for, whatever the server's, database's or role's
    defaults: time zone UTC (timestamps come back in UTC: the API's, the heatmap's hours)
    and isolation read committed (the guarded writes check their version and lease in
    the statement itself; under a `serializable` default, a conflict failed with 40001
    as StoreUnavailable, never retried)."""
    return (
        f"-c lock_timeout={int(lock_timeout * 1000)} "
        f"-c statement_timeout={int(statement_timeout * 1000)} "
        "-c timezone=UTC "
        "-c default_transaction_isolation=read\\ committed"  # libpq: an escaped space
    )


# A link cut without a reset (a dead router, a failover, a dropped NAT entry) is found by
# TCP keepalives: 10 s of silence, then 3 probes 5 s apart. With the OS defaults (2 h
# idle, 9 probes 75 s apart) a COMMIT whose answer was lost held the one commit thread,
# and every write queued behind it, for 2 h 11 min; statement_timeout is the server's
# and cannot end a wait once the server is out of reach.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3
# Bounds of tcp_user_timeout (s): how long data sent may stay unacknowledged by the
# server's host (a healthy one acknowledges at once, however slow the statement).
LINK_TIMEOUT_MIN, LINK_TIMEOUT_MAX = 10.0, 120.0


def pg_link(*, lock_timeout: float, statement_timeout: float) -> dict[str, Any]:
    """libpq's parameters that bound a wait on the network (the server's own waits are
    `pg_options`'): connecting, and a server gone silent, idle (keepalives) or with our
    bytes unacknowledged (tcp_user_timeout: the longest wait the server may make us,
    lock + statement timeout, within 10-120 s). Either way the connection breaks, the
    waiting call gets StoreUnavailable, and the next write opens a new connection."""
    link = min(max(lock_timeout + statement_timeout, LINK_TIMEOUT_MIN), LINK_TIMEOUT_MAX)
    return {
        "connect_timeout": max(1, int(lock_timeout)),
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE,
        "keepalives_interval": KEEPALIVE_INTERVAL,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": int(link * 1000),
    }


def _sqlite_setup(conn: Any, lock_timeout: float) -> None:
    for statement in sql.sqlite_pragmas(busy_ms=int(lock_timeout * 1000)):
        conn.execute(statement)


def make_engine(url: str, *, lock_timeout: float = 5.0, statement_timeout: float = 30.0) -> Engine:
    """The read pool, with bounded waits: a lock or a slow statement ends in an error."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": lock_timeout}
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            _sqlite_setup(cursor, lock_timeout)
            cursor.close()

        return _closing_late_returns(engine)
    # Reads are off the hot path: a pre-ping per checkout finds a connection the server
    # dropped (restart, pg_terminate_backend) before a request meets it.
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_size=10,
        max_overflow=10,
        pool_timeout=lock_timeout,
        connect_args={
            "options": pg_options(lock_timeout=lock_timeout, statement_timeout=statement_timeout),
            **pg_link(lock_timeout=lock_timeout, statement_timeout=statement_timeout),
        },
    )
    return _closing_late_returns(engine)


def migration_engine(url: str) -> Engine:
    """The connection Alembic migrates through: `MIGRATION_LOCK_TIMEOUT`, no statement
    time limit (0: none, to PostgreSQL)."""
    return make_engine(url, lock_timeout=MIGRATION_LOCK_TIMEOUT, statement_timeout=0)


# Engines closed for good (`close_engine`): every connection is closed on its return.
_CLOSED: weakref.WeakSet[Engine] = weakref.WeakSet()


def close_engine(engine: Engine) -> None:
    """Close the read pool for good: its idle connections now, and from then on each
    connection as it comes back. A read that starts later (a thread's, queued before its
    process or test closed the store) still works, on a connection of its own that is
    closed once it is done; after a plain `dispose()` it would stay open in the fresh
    pool nobody closes, until the collector found it (and psycopg's finaliser warned)."""
    _CLOSED.add(engine)
    engine.dispose()


def _closing_late_returns(engine: Engine) -> Engine:
    """A connection given back after `engine.dispose()` is closed on its return. It was
    checked out when the pool was disposed (a read a thread still ran when its process,
    or a test, closed the store), and goes back to the discarded pool, whose idle
    connections nobody closes: it stayed open until the collector found it, then
    psycopg's finaliser warned (a test failed at random under `filterwarnings = error`)."""
    generation = 0

    @event.listens_for(engine, "checkout")
    def _stamp(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        record.info["generation"] = generation

    @event.listens_for(engine, "engine_disposed")
    def _discarded(_engine: Engine) -> None:
        nonlocal generation
        generation += 1

    @event.listens_for(engine, "checkin")
    def _close_late(dbapi_conn: Any, record: Any) -> None:
        if dbapi_conn is None:
            return
        if engine in _CLOSED or record.info.get("generation", generation) != generation:
            record.invalidate()

    return engine


def backend(
    engine: Engine,
    *,
    lock_timeout: float,
    statement_timeout: float,
    synchronous_commit: bool = True,
) -> Backend:
    """The committer's own connection to the engine's database, with bounded waits.
    `synchronous_commit=False` (PostgreSQL): a commit returns before its WAL reaches the
    disk (the WAL writer flushes it within ~0.2 s, and any later synchronous commit of the
    server flushes it first), for writes that a lost commit only makes be done again."""
    url = engine.url
    if engine.dialect.name == "sqlite":

        def connect_sqlite() -> Any:
            conn = sqlite3.connect(
                url.database or ":memory:", timeout=lock_timeout, check_same_thread=False
            )
            _sqlite_setup(conn, lock_timeout)
            return conn

        return Backend(
            connect=connect_sqlite,
            begin=sql.SQLITE_BEGIN,  # take the write lock up front: no upgrade deadlocks
            errors=(sqlite3.Error,),
            translate=_translate,
            broken=lambda conn: False,
            close=lambda conn: conn.close(),
            bound_wait=_busy_timeout,
            busy=_busy,
        )

    import psycopg

    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    durability = "" if synchronous_commit else " -c synchronous_commit=off"
    options = pg_options(lock_timeout=lock_timeout, statement_timeout=statement_timeout)
    options += durability
    batch_options = pg_options(
        lock_timeout=min(lock_timeout, BATCH_LOCK_TIMEOUT), statement_timeout=statement_timeout
    )
    batch_options += durability
    link = pg_link(lock_timeout=lock_timeout, statement_timeout=statement_timeout)

    def connect_pg(options: str = batch_options) -> Any:
        return psycopg.connect(conninfo, options=options, **link)

    common: dict[str, Any] = {
        "begin": None,  # psycopg opens the transaction at the first statement
        "errors": (psycopg.Error,),
        "translate": _translate,
        "broken": lambda conn: bool(conn.closed or conn.broken),
        "close": lambda conn: conn.close(),
    }
    side = Backend(connect=lambda: connect_pg(options), bound_wait=_pg_lock_timeout, **common)
    return Backend(
        connect=connect_pg,
        pipeline=lambda conn: conn.pipeline(),
        row_locked=lambda exc: isinstance(exc, psycopg.errors.LockNotAvailable),
        side=side,
        **common,
    )


def _pg_lock_timeout(conn: Any, seconds: float) -> None:
    """The side lane's wait for a row: what is left of the op's own lock timeout (0 would
    mean no limit at all to PostgreSQL)."""
    conn.execute(sql.pg_lock_timeout(lock_ms=max(1, int(seconds * 1000))))


def _busy_timeout(conn: Any, seconds: float) -> None:
    conn.execute(sql.sqlite_busy_timeout(busy_ms=int(seconds * 1000)))


def _busy(exc: BaseException) -> bool:
    """Another connection holds SQLite's write lock (SQLITE_BUSY)."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


def _translate(exc: BaseException) -> BaseException:
    """Driver errors a caller can only wait out become StoreUnavailable, in one line."""
    import psycopg

    if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
        return store_unavailable("database busy", exc)  # (before: they are Operational)
    if isinstance(exc, sqlite3.OperationalError | psycopg.OperationalError):
        return store_unavailable("database unavailable", exc)
    return exc
