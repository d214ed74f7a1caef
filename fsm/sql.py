"""Every write's SQL (the hot path's moves, the leases, the connection set-up), written
once per dialect, and the codec between rows and `Order`. The reads are `fsm.queries`'.

The engine's writes run on the committer thread's own DBAPI connection (sqlite3 or
psycopg), not through SQLAlchemy: its execution path cost ~0.25 ms a statement, more than
SQLite itself. Statement texts are built once and reused, so sqlite3's statement cache and
psycopg's server-side prepared statements apply. Values are encoded exactly as SQLAlchemy
stores them (SQLite: uuid as 32 hex digits, timestamps as naive-UTC text, JSON as text), so
the reads, which do go through SQLAlchemy, see the same rows. Column lists come from the
schema and the machine (`ORDER_COLUMNS`, `STATE_COLUMN`). No decisions, no connections.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine

from fsm.errors import CorruptOrder
from fsm.machine import TERMINAL_ORDER_STATES, OrderState, Status, StepState
from fsm.models import ORDER_COLUMNS, STATE_COLUMN, Order

_TIMESTAMPS = frozenset(
    {"lease_expires_at", "next_attempt_at", "deadline_at", "created_at", "updated_at"}
)
_STAMPED = _TIMESTAMPS | {"order_created_at"}  # encoded as timestamps (transitions' too)
_JSON = frozenset({"attempts", "detail"})
_KNOWN = {
    "status": frozenset(Status),
    **{
        column: frozenset(OrderState if scope == "order" else StepState)
        for scope, column in STATE_COLUMN.items()
    },
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
    "order_created_at",  # the partition key on PostgreSQL (fsm.partitions)
)

ATTEMPT_COLUMNS = (
    "order_id",
    "created_at",
    "call",
    "attempt",
    "error",
    "next_attempt_at",
    "waiting_on",
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
        if column in _STAMPED:
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
        """'YYYY-MM-DD HH:MM:SS.ffffff' in UTC. isoformat (cut before any '+00:00'), not
        strftime: a third of its CPU, a few timestamps per transition on the writer."""
        if value.tzinfo is not None and value.utcoffset():
            value = value.astimezone(UTC)
        return value.isoformat(" ", "microseconds")[:26]

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
    """A timestamp from the database in UTC: SQLite hands them back naive (they were
    written as UTC); an aware one in another zone is converted, not just labelled."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_utc(value: Any) -> datetime | None:
    """A timestamp as a driver hands it back raw (SQLite: ISO text; PostgreSQL: a
    datetime), in UTC; ValueError if it is not one."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is not None and not isinstance(value, datetime):
        raise ValueError(f"{value!r} is not a timestamp")
    return as_utc(value)


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

PROBE = "SELECT 1"  # fsm.health's probe: a round trip inside the writer's transaction


# The concurrency guard of every write to an order: the row is changed only at the version
# the writer read and while the writer holds its lease (else StaleOrder or LeaseLost).
_GUARD = "WHERE id = %s AND version = %s AND lease_owner = %s"
_TRANSITION_NAMES = ", ".join(_quoted(c) for c in TRANSITION_COLUMNS)
_TRANSITION_MARKS = ", ".join(["%s"] * len(TRANSITION_COLUMNS))


def _guarded(columns: tuple[str, ...]) -> str:
    sets = ", ".join(f"{c} = %s" for c in columns)
    return f"UPDATE orders SET {sets} {_GUARD}"


@lru_cache(maxsize=128)
def guarded_update(dialect: Dialect, columns: tuple[str, ...]) -> str:
    """UPDATE orders SET <columns> WHERE id, version and lease owner match."""
    return dialect.sql(_guarded(columns))


def guarded_move_then(columns: tuple[str, ...], then: str | None = None) -> str:
    """PostgreSQL, one statement: `guarded_update` (the CTE `moved`) and, only if it
    matched, `insert_transition`. `then`: a last statement that runs only if both did,
    reading the CTE `logged` (the transition's order_id); parameters: the update's, the
    transition's, then `then`'s. Callers cache the text (`guarded_move`,
    fsm.outbox_sql.move_with_event)."""
    moved = f"WITH moved AS ({_guarded(columns)} RETURNING id)"
    log = f"INSERT INTO transitions ({_TRANSITION_NAMES}) SELECT {_TRANSITION_MARKS} FROM moved"
    if then is None:
        return f"{moved} {log}"
    return f"{moved}, logged AS ({log} RETURNING order_id) {then}"


@lru_cache(maxsize=128)
def guarded_move(dialect: Dialect, columns: tuple[str, ...]) -> str:
    """`guarded_update` and, only if it matched, `insert_transition`, as one PostgreSQL
    statement: its row count is 1 when both happened, 0 when neither did."""
    return guarded_move_then(columns)


@lru_cache(maxsize=8)
def insert_order(dialect: Dialect) -> str:
    marks = ", ".join(["%s"] * len(ORDER_COLUMNS))
    return dialect.sql(
        f"INSERT INTO orders ({', '.join(ORDER_COLUMNS)}) VALUES ({marks}) ON CONFLICT DO NOTHING"
    )


@lru_cache(maxsize=8)
def insert_transition(dialect: Dialect) -> str:
    return dialect.sql(
        f"INSERT INTO transitions ({_TRANSITION_NAMES}) VALUES ({_TRANSITION_MARKS})"
    )


@lru_cache(maxsize=8)
def insert_attempt(dialect: Dialect) -> str:
    marks = ", ".join(["%s"] * len(ATTEMPT_COLUMNS))
    return dialect.sql(f"INSERT INTO attempts ({', '.join(ATTEMPT_COLUMNS)}) VALUES ({marks})")


@lru_cache(maxsize=8)
def select_order(dialect: Dialect, by: str) -> str:
    columns = ", ".join(ORDER_COLUMNS)
    return dialect.sql(f"SELECT {columns} FROM orders WHERE {by} = %s")


@lru_cache(maxsize=8)
def select_order_by_key(dialect: Dialect) -> str:
    """An idempotency key is unique per caller (created_by), not globally (issue 17)."""
    columns = ", ".join(ORDER_COLUMNS)
    return dialect.sql(
        f"SELECT {columns} FROM orders WHERE created_by = %s AND idempotency_key = %s"
    )


# -- leases -------------------------------------------------------------------------------

# Orders the sweep may pick up: a known, non-terminal state (a corrupt row never matches).
RESUMABLE = tuple(s.value for s in OrderState if s not in TERMINAL_ORDER_STATES)
# A lease a stopping driver gave back (its run cancelled: SIGTERM, shutdown): no owner, the
# release's time kept in lease_expires_at (any other release clears both). Nothing drives
# such an order, so the sweep takes it at once, not only once unmoved for SWEEP_OLDER_THAN.
HANDED_BACK = "(lease_owner IS NULL AND lease_expires_at IS NOT NULL)"
# Parked: no driver holds it, nothing moves it until a retry. The age guard (leave a live
# driver's order alone) means nothing there: an operator's `resume` takes it at any age.
PARKED = OrderState.NEEDS_ATTENTION.value
# The order's state and each step's, in the machine's order: what fsm.upgrade groups by.
STATE_COLUMNS = tuple(STATE_COLUMN.values())


@lru_cache(maxsize=8)
def select_lease(dialect: Dialect) -> str:
    return dialect.sql("SELECT version, lease_owner FROM orders WHERE id = %s")


# A claim that takes over a lease another owner held and let expire (its driver died:
# not a lease handed back, nor a free one, nor our own) counts an interruption, in the
# claim's own UPDATE (SET reads the row as it was). Parameters: owner, now.
INTERRUPTED = (
    "interruptions = interruptions + "
    "CASE WHEN lease_owner <> %s AND lease_expires_at < %s THEN 1 ELSE 0 END"
)


@lru_cache(maxsize=8)
def claim(dialect: Dialect) -> str:
    """Take the lease if free, expired or already the owner's; the row comes back.
    Parameters: owner, lease end, owner, now (INTERRUPTED), id, now, owner."""
    return dialect.sql(
        f"UPDATE orders SET lease_owner = %s, lease_expires_at = %s, {INTERRUPTED} "
        "WHERE id = %s AND (lease_owner IS NULL OR lease_expires_at < %s OR lease_owner = %s) "
        + dialect.returning
    )


@lru_cache(maxsize=8)
def select_logged(dialect: Dialect) -> str:
    """One line of an order's log by its seq (the unique key, partition key included)."""
    return dialect.sql(
        "SELECT scope, trigger, to_state FROM transitions"
        " WHERE order_id = %s AND seq = %s AND order_created_at = %s"
    )


@lru_cache(maxsize=8)
def order_exists(dialect: Dialect) -> str:
    return dialect.sql("SELECT 1 FROM orders WHERE id = %s")


# An order whose driver died under it twice in a row with no move between: maybe what
# kills its drivers, maybe beside it each time (a slow call in flight). The sweep drives
# such suspects one at a time, so one beside the culprit moves (its count back to 0)
# instead of being held with it (fsm.recovery.resume_stuck).
SUSPECT = 2


@lru_cache(maxsize=128)
def claim_batch(
    dialect: Dialect,
    *,
    due_only: bool,
    excluded: int,
    undrivable: int,
    held: bool = False,
    suspects: bool | None = None,
) -> str:
    """Lease up to N stuck orders, oldest first, in one statement (not `due_only`: parked
    ones at any age). `held` (ORDER_SAGA_MAX_INTERRUPTIONS not 0, and no person's
    `--include-held`): orders interrupted that many times in a row stay put. `suspects`
    (the sweep's): True only SUSPECT ones, False none of them. Parameters:
    owner, lease end, owner, now (INTERRUPTED), moved-before, now, [now if due_only],
    [max interruptions if held], excluded ids, undrivable combinations (flattened in
    STATE_COLUMNS order), limit."""
    resumable = ", ".join(f"'{s}'" for s in RESUMABLE)
    # The sweep (due_only) keeps a park's own pause; an operator's resume takes it now.
    unmoved = "updated_at <= %s" if due_only else f"(updated_at <= %s OR state = '{PARKED}')"
    where = [
        f"state IN ({resumable})",
        f"({HANDED_BACK} OR ({unmoved} AND (lease_owner IS NULL OR lease_expires_at < %s)))",
    ]
    if due_only:  # the sweep honours the persisted retry schedule; an operator may not
        where.append("(next_attempt_at IS NULL OR next_attempt_at <= %s)")
    if held:  # a person takes a held order by its id, or with `resume --include-held`
        where.append("interruptions < %s")
    if suspects is not None:
        where.append(f"interruptions {'>=' if suspects else '<'} {SUSPECT}")
    if excluded:
        where.append(f"id NOT IN ({', '.join(['%s'] * excluded)})")
    if undrivable:  # fsm.upgrade.guard(): what this machine cannot drive stays put
        row = f"({', '.join(['%s'] * len(STATE_COLUMNS))})"
        where.append(
            f"({', '.join(STATE_COLUMNS)}) NOT IN (VALUES {', '.join([row] * undrivable)})"
        )
    candidates = (
        f"SELECT id FROM orders WHERE {' AND '.join(where)} "
        f"ORDER BY updated_at LIMIT %s {dialect.skip_locked}"
    )
    return dialect.sql(
        f"UPDATE orders SET lease_owner = %s, lease_expires_at = %s, {INTERRUPTED} "
        f"WHERE id IN ({candidates}) {dialect.returning}"
    )


@lru_cache(maxsize=128)
def renew(dialect: Dialect, count: int) -> str:
    """Extend the leases of `count` orders the owner still holds. A row another session
    has locked is skipped (PostgreSQL), not waited for: one locked order must not cost
    every other order its lease (it is renewed at the next interval)."""
    return dialect.sql(
        "UPDATE orders SET lease_expires_at = %s WHERE id IN (SELECT id FROM orders "
        f"WHERE lease_owner = %s AND id IN ({', '.join(['%s'] * count)}) {dialect.skip_locked})"
    )


@lru_cache(maxsize=8)
def release(dialect: Dialect, *, at_version: bool) -> str:
    """Give the lease back if the owner holds it (and, `at_version`, the order is still at
    the version given last). Parameters: lease_expires_at (None, or the time of a
    handing back: HANDED_BACK), id, owner[, version]."""
    return dialect.sql(
        "UPDATE orders SET lease_owner = NULL, lease_expires_at = %s "
        "WHERE id = %s AND lease_owner = %s" + (" AND version = %s" if at_version else "")
    )


# -- connection set-up (used by fsm.engine for both kinds of connection) ------------------

SQLITE_BEGIN = "BEGIN IMMEDIATE"  # take the write lock up front: no upgrade deadlocks


def pg_lock_timeout(*, lock_ms: int) -> str:
    return f"SET lock_timeout = {int(lock_ms)}"


def pg_wait_for_log_writers(*, lock_ms: int) -> tuple[str, ...]:
    """The heatmap roll-up's (`fsm.rollup`): wait, at most `lock_ms`, until every
    transaction writing the transition log has committed (new writers queue meanwhile)."""
    return (f"SET LOCAL lock_timeout = {int(lock_ms)}", "LOCK TABLE transitions IN SHARE MODE")


def sqlite_busy_timeout(*, busy_ms: int) -> str:
    return f"PRAGMA busy_timeout={busy_ms}"


def sqlite_pragmas(*, busy_ms: int) -> tuple[str, ...]:
    return (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",  # durable across process crashes
        sqlite_busy_timeout(busy_ms=busy_ms),
        sqlite_foreign_keys(on=True),
    )


def sqlite_foreign_keys(*, on: bool) -> str:
    """A no-op inside a transaction: set it between them (the migrations turn the keys
    off around theirs, `migrations/env.py`)."""
    return f"PRAGMA foreign_keys={'ON' if on else 'OFF'}"


SQLITE_FOREIGN_KEY_CHECK = "PRAGMA foreign_key_check"  # rows: (table, rowid, parent, fkid)


def first_line(exc: BaseException | None) -> str:
    """Drivers append hints and context on more lines; an error message is the first."""
    return (str(exc).strip().splitlines() or [""])[0]
