"""The hot path's SQL, written once per dialect, and the codec between rows and `Order`.

The engine's writes run on the committer thread's own DBAPI connection (sqlite3 or
psycopg), not through SQLAlchemy: its execution path cost ~0.25 ms a statement, more than
SQLite itself. Statement texts are built once and reused, so sqlite3's statement cache and
psycopg's server-side prepared statements apply. Values are encoded exactly as SQLAlchemy
stores them (SQLite: uuid as 32 hex digits, timestamps as naive-UTC text, JSON as text), so
the reads, which do go through SQLAlchemy, see the same rows. No decisions here.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine

from fsm.committer import Backend
from fsm.errors import CorruptOrder, StoreUnavailable
from fsm.machine import OrderState, Status, StepState
from fsm.models import ORDER_COLUMNS, Order

_TIMESTAMPS = frozenset(
    {"lease_expires_at", "next_attempt_at", "deadline_at", "created_at", "updated_at"}
)
_JSON = frozenset({"attempts", "detail"})
_KNOWN = {
    "state": frozenset(OrderState),
    "status": frozenset(Status),
    **{f"{step}_state": frozenset(StepState) for step in ("payment", "inventory", "shipping")},
}
TRANSITION_COLUMNS = (
    "order_id",
    "seq",
    "scope",
    "trigger",
    "from_state",
    "to_state",
    "detail",
    "created_at",
    "machine_version",
)


class Dialect:
    """Statement texts and value encodings of one database."""

    name = "postgresql"
    placeholder = "%s"

    # -- encoding (Python -> driver) -------------------------------------------------

    def encode(self, column: str, value: Any) -> Any:
        if value is None:
            return None
        if column == "id" or column == "order_id":
            return self.uuid(value)
        if column in _TIMESTAMPS:
            return self.timestamp(value)
        if column in _JSON:
            return self.json(value)
        return value

    def uuid(self, value: uuid.UUID) -> Any:
        return value

    def timestamp(self, value: datetime) -> Any:
        return value

    def json(self, value: Any) -> Any:
        from psycopg.types.json import Json

        return Json(value)

    # -- decoding (driver -> Order) --------------------------------------------------

    def order(self, row: Iterable[Any]) -> Order:
        """A row of ORDER_COLUMNS as an Order; a state no machine knows raises CorruptOrder."""
        data = dict(zip(ORDER_COLUMNS, row, strict=True))
        return order_from(self._decode(data))

    def _decode(self, data: dict[str, Any]) -> dict[str, Any]:
        for key in _TIMESTAMPS:
            data[key] = as_utc(data[key])
        return data

    # -- statements ------------------------------------------------------------------

    def sql(self, text: str) -> str:
        return text

    @property
    def returning(self) -> str:
        return "RETURNING " + ", ".join(_quoted(c) for c in ORDER_COLUMNS)

    @property
    def skip_locked(self) -> str:
        return "FOR UPDATE SKIP LOCKED"

    # The guarded UPDATE and its transition row in one statement (one round trip to the
    # server instead of two: a batch of N moves costs N, see `guarded_move`).
    moves_in_one_statement = True


class SQLiteDialect(Dialect):
    name = "sqlite"
    placeholder = "?"

    def uuid(self, value: uuid.UUID) -> Any:
        return value.hex

    def timestamp(self, value: datetime) -> Any:
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")

    def json(self, value: Any) -> Any:
        return json.dumps(value)

    def _decode(self, data: dict[str, Any]) -> dict[str, Any]:
        data["id"] = uuid.UUID(data["id"])
        for key in _TIMESTAMPS:
            if isinstance(data[key], str):
                data[key] = datetime.fromisoformat(data[key]).replace(tzinfo=UTC)
        try:
            data["attempts"] = json.loads(data["attempts"])
        except (TypeError, ValueError):
            pass  # order_from reports it
        data["cancel_requested"] = bool(data["cancel_requested"])
        return data

    def sql(self, text: str) -> str:
        return text.replace("%s", "?")

    @property
    def skip_locked(self) -> str:
        return ""  # one writer at a time: nothing to skip

    moves_in_one_statement = False  # in-process: a statement costs no round trip


def _quoted(column: str) -> str:
    return '"trigger"' if column == "trigger" else column


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were written as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def order_from(data: dict[str, Any]) -> Order:
    """Validate a decoded row: a state no machine declares is reported, never guessed."""
    for column, known in _KNOWN.items():
        if data[column] not in known:
            raise CorruptOrder(
                f"order {data['id']} is corrupt: {column} = {data[column]!r} "
                f"is not one of the machine's states"
            )
    if not isinstance(data["attempts"], dict):
        raise CorruptOrder(f"order {data['id']} is corrupt: attempts is not a JSON object")
    return Order(**data)


SQLITE, POSTGRESQL = SQLiteDialect(), Dialect()


def dialect_of(engine: Engine) -> Dialect:
    return SQLITE if engine.dialect.name == "sqlite" else POSTGRESQL


# -- statement texts, built once ---------------------------------------------------------


@lru_cache(maxsize=128)
def guarded_update(dialect: Dialect, columns: tuple[str, ...]) -> str:
    """UPDATE orders SET <columns> WHERE id, version and lease owner match."""
    sets = ", ".join(f"{c} = %s" for c in columns)
    return dialect.sql(
        f"UPDATE orders SET {sets} WHERE id = %s AND version = %s AND lease_owner = %s"
    )


@lru_cache(maxsize=128)
def guarded_move(dialect: Dialect, columns: tuple[str, ...]) -> str:
    """`guarded_update` and, only if it matched, `insert_transition`, as one PostgreSQL
    statement: its row count is 1 when both happened, 0 when neither did."""
    sets = ", ".join(f"{c} = %s" for c in columns)
    names = ", ".join(_quoted(c) for c in TRANSITION_COLUMNS)
    marks = ", ".join(["%s"] * len(TRANSITION_COLUMNS))
    return (
        f"WITH moved AS (UPDATE orders SET {sets} "
        "WHERE id = %s AND version = %s AND lease_owner = %s RETURNING id) "
        f"INSERT INTO transitions ({names}) SELECT {marks} FROM moved"
    )


@lru_cache(maxsize=8)
def insert_order(dialect: Dialect) -> str:
    marks = ", ".join(["%s"] * len(ORDER_COLUMNS))
    return dialect.sql(
        f"INSERT INTO orders ({', '.join(ORDER_COLUMNS)}) VALUES ({marks}) ON CONFLICT DO NOTHING"
    )


@lru_cache(maxsize=8)
def insert_transition(dialect: Dialect) -> str:
    columns = ", ".join(_quoted(c) for c in TRANSITION_COLUMNS)
    marks = ", ".join(["%s"] * len(TRANSITION_COLUMNS))
    return dialect.sql(f"INSERT INTO transitions ({columns}) VALUES ({marks})")


@lru_cache(maxsize=8)
def select_order(dialect: Dialect, by: str) -> str:
    columns = ", ".join(ORDER_COLUMNS)
    return dialect.sql(f"SELECT {columns} FROM orders WHERE {by} = %s")


# -- the committer's connection ----------------------------------------------------------


def backend(engine: Engine, *, lock_timeout: float, statement_timeout: float) -> Backend:
    """The committer's own connection to the engine's database, with bounded waits."""
    url = engine.url
    if engine.dialect.name == "sqlite":

        def connect_sqlite() -> Any:
            conn = sqlite3.connect(
                url.database or ":memory:", timeout=lock_timeout, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
            conn.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn

        return Backend(
            connect=connect_sqlite,
            begin="BEGIN IMMEDIATE",  # take the write lock up front: no upgrade deadlocks
            errors=(sqlite3.Error,),
            translate=_translate,
            broken=lambda conn: False,
            close=lambda conn: conn.close(),
            bound_wait=_busy_timeout,
            busy=_busy,
        )

    import psycopg

    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    options = (
        f"-c lock_timeout={int(lock_timeout * 1000)} "
        f"-c statement_timeout={int(statement_timeout * 1000)}"
    )

    def connect_pg() -> Any:
        return psycopg.connect(conninfo, options=options, connect_timeout=max(1, int(lock_timeout)))

    return Backend(
        connect=connect_pg,
        begin=None,  # psycopg opens the transaction at the first statement
        errors=(psycopg.Error,),
        translate=_translate,
        broken=lambda conn: bool(conn.closed or conn.broken),
        close=lambda conn: conn.close(),
        pipeline=lambda conn: conn.pipeline(),
    )


def _busy_timeout(conn: Any, seconds: float) -> None:
    conn.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")


def _busy(exc: BaseException) -> bool:
    """Another connection holds SQLite's write lock (SQLITE_BUSY)."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


def first_line(exc: BaseException | None) -> str:
    """Drivers append hints and context on more lines; an error message is the first."""
    return (str(exc).strip().splitlines() or [""])[0]


def _translate(exc: BaseException) -> BaseException:
    """Driver errors a caller can only wait out become StoreUnavailable, in one line."""
    import psycopg

    first = first_line(exc)
    if isinstance(exc, sqlite3.OperationalError | psycopg.OperationalError):
        return StoreUnavailable(f"database unavailable: {first}")
    if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
        return StoreUnavailable(f"database busy: {first}")
    return exc
