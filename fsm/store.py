"""The engine's storage: create orders, record transitions under a version and lease check,
claim, renew and release leases, find stuck orders. No HTTP, no business decisions. The
write statements' texts and the row codec live in `fsm.sql`; the operator's read-only
views in `fsm.queries`; the start-up check's grouped query in `fsm.upgrade`.

Writes are coroutines: each is an op for the group-commit thread (`fsm.committer`), so the
event loop never waits on the database and concurrent orders share commits. Reads are plain
functions on SQLAlchemy's pool, for the API's worker threads and the CLI; async code calls
them through `asyncio.to_thread`.

In-memory contract: a write applies its values to the `Order` when it is *queued*, so the
next write of the same order (a concurrent step's) builds on it; writes of one order commit
in the order they were queued. If a write fails, it and every later write of that order
fail (the version chain breaks), and the caller must stop driving the order.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Generator, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, or_, select
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError

from fsm import sql
from fsm.committer import Committer
from fsm.errors import (
    CorruptOrder,
    InvalidMove,
    LeaseLost,
    OrderNotFound,
    StaleOrder,
    StoreUnavailable,
)
from fsm.machine import (
    MACHINE_VERSION,
    ORDER_MACHINE,
    STEP_MACHINE,
    TERMINAL_ORDER_STATES,
    MachineError,
    OrderState,
    Status,
    StepState,
    coarse_status,
    next_state,
)
from fsm.models import ORDER_COLUMNS, STATE_COLUMN, Order, OrderTable, Transition, TransitionTable

__all__ = ["STATE_COLUMN", "Store", "make_engine", "step_states", "utcnow"]

log = logging.getLogger("order_saga.store")
orders = OrderTable.__table__  # type: ignore[attr-defined]
transitions = TransitionTable.__table__  # type: ignore[attr-defined]

# Orders the sweep may pick up: a known, non-terminal state (a corrupt row never matches).
_RESUMABLE = tuple(s.value for s in OrderState if s not in TERMINAL_ORDER_STATES)
_STATES = "state, payment_state, inventory_state, shipping_state"
_RESUMABLE_SQL = ", ".join(f"'{s}'" for s in _RESUMABLE)


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, *, lock_timeout: float = 5.0, statement_timeout: float = 30.0) -> Engine:
    """The read pool, with bounded waits: a lock or a slow statement ends in an error."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": lock_timeout}
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
            cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    options = (
        f"-c lock_timeout={int(lock_timeout * 1000)} "
        f"-c statement_timeout={int(statement_timeout * 1000)}"
    )
    # Reads are off the hot path: a pre-ping per checkout finds a connection the server
    # dropped (restart, pg_terminate_backend) before a request meets it.
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_size=10,
        max_overflow=10,
        pool_timeout=lock_timeout,
        connect_args={"options": options, "connect_timeout": max(1, int(lock_timeout))},
    )


def step_states(order: Order) -> dict[str, str]:
    return order.step_states()


class Store:
    """Orders and their transition log in one SQL database."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: float = 30.0,
        lock_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        max_batch: int = 256,
    ) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)
        self.is_postgres = engine.dialect.name == "postgresql"
        self.dialect = sql.dialect_of(engine)
        # (state, payment, inventory, shipping) combinations the installed machine cannot
        # drive, found at start by fsm.upgrade.guard(): the sweep leaves those orders alone.
        self.undrivable: frozenset[tuple[str, str, str, str]] = frozenset()
        self.committer = Committer(
            sql.backend(engine, lock_timeout=lock_timeout, statement_timeout=statement_timeout),
            max_batch=max_batch,
            lock_timeout=lock_timeout,
        )

    def close(self) -> None:
        """Commit what is queued and stop the writer thread (the engine stays the caller's)."""
        self.committer.close()

    # -- writes ----------------------------------------------------------------------

    async def create_order(
        self,
        *,
        user_id: int,
        product_id: int,
        quantity: int,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> tuple[Order, bool]:
        """Insert a pending order, already leased to `owner` if given. With an idempotency
        key already used, return that order instead: (order, created)."""
        now = utcnow()
        order = Order(
            id=uuid.uuid4(),
            idempotency_key=idempotency_key,
            user_id=user_id,
            product_id=product_id,
            quantity=quantity,
            state=OrderState.PENDING.value,
            status=Status.PENDING.value,
            payment_state=StepState.PENDING.value,
            inventory_state=StepState.PENDING.value,
            shipping_state=StepState.PENDING.value,
            lease_owner=owner,
            lease_expires_at=now + self.lease if owner else None,
            created_at=now,
            updated_at=now,
            machine_version=MACHINE_VERSION,
        )
        return await self.committer.submit(partial(self._insert, order))

    def _insert(self, order: Order, cursor: Any) -> Generator[None, None, tuple[Order, bool]]:
        d = self.dialect
        cursor.execute(sql.insert_order(d), [d.encode(c, getattr(order, c)) for c in ORDER_COLUMNS])
        yield  # (a committer op: statements sent, results next)
        if cursor.rowcount == 1:
            return order, True
        # A unique conflict: the key was used before, or (a retried batch whose first
        # commit's answer was lost) this very row is already there.
        for by, value in (("id", order.id), ("idempotency_key", order.idempotency_key)):
            if value is not None:
                cursor.execute(sql.select_order(d, by), [d.encode(by, value)])
                row = cursor.fetchone()
                if row is not None:
                    return d.order(row), by == "id"
        raise StaleOrder(f"order {order.id} could not be inserted (conflict)")

    async def record_transition(
        self,
        *,
        order: Order,
        owner: str,
        scope: str,
        trigger: str,
        detail: dict[str, Any] | None = None,
        **changes: Any,
    ) -> str:
        """Validate `trigger` against the machine, then commit the new state and its log
        line in one transaction guarded by version and lease; a terminal state releases the
        lease in the same UPDATE. Returns the new state. Raises InvalidMove (nothing queued),
        StaleOrder or LeaseLost (nothing written)."""
        column = STATE_COLUMN[scope]
        source = getattr(order, column)
        machine = ORDER_MACHINE if scope == "order" else STEP_MACHINE
        try:
            dest = next_state(machine, source, trigger)
        except MachineError as exc:
            raise InvalidMove(f"{scope}: cannot {trigger} from {source}") from exc
        now = utcnow()
        seq = order.version + 1
        values: dict[str, Any] = {
            column: dest,
            "version": seq,
            "updated_at": now,
            "lease_expires_at": now + self.lease,
            **changes,
        }
        if scope == "order":
            values["status"] = coarse_status(dest).value
            if dest in TERMINAL_ORDER_STATES:
                values["lease_owner"] = values["lease_expires_at"] = None
        line = (order.id, seq, scope, trigger, source, dest, detail, now, MACHINE_VERSION)
        await self._write(order, owner, values, line)
        return dest

    async def note_attempt(
        self,
        *,
        order: Order,
        owner: str,
        call: str,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> None:
        """Persist the retry schedule of one call (count, last error, next attempt)."""
        attempts = {**order.attempts, call: order.attempts.get(call, 0) + 1}
        values = {"attempts": attempts, "last_error": error, "next_attempt_at": next_attempt_at}
        await self._write(order, owner, values, None)

    async def _write(
        self, order: Order, owner: str, values: dict[str, Any], line: tuple[Any, ...] | None
    ) -> None:
        expected = order.version
        before = {key: getattr(order, key) for key in values}
        for key, value in values.items():  # queued: the next write builds on it
            setattr(order, key, value)
        try:
            await self.committer.submit(
                partial(self._guarded, order.id, expected, owner, values, line)
            )
        except BaseException:
            if order.version == values.get("version", expected):  # nothing queued on top
                for key, value in before.items():
                    setattr(order, key, value)
            raise

    def _guarded(
        self,
        order_id: uuid.UUID,
        expected: int,
        owner: str,
        values: dict[str, Any],
        line: tuple[Any, ...] | None,
        cursor: Any,
    ) -> Generator[None, None, None]:
        d = self.dialect
        columns = tuple(values)
        params = [*(d.encode(c, values[c]) for c in columns), d.uuid(order_id), expected, owner]
        logged = (
            [d.encode(c, v) for c, v in zip(sql.TRANSITION_COLUMNS, line, strict=True)]
            if line is not None
            else None
        )
        if logged is not None and d.moves_in_one_statement:
            cursor.execute(sql.guarded_move(d, columns), [*params, *logged])
            yield  # (a committer op: statements sent, results next)
            if cursor.rowcount != 1:
                self._raise_conflict(cursor, order_id, expected, owner)
            return
        cursor.execute(sql.guarded_update(d, columns), params)
        yield
        if cursor.rowcount != 1:
            self._raise_conflict(cursor, order_id, expected, owner)
        if logged is not None:
            cursor.execute(sql.insert_transition(d), logged)

    def _raise_conflict(self, cursor: Any, order_id: uuid.UUID, expected: int, owner: str) -> None:
        d = self.dialect
        cursor.execute(
            d.sql("SELECT version, lease_owner FROM orders WHERE id = %s"), [d.uuid(order_id)]
        )
        row = cursor.fetchone()
        if row is None:
            raise OrderNotFound(f"order {order_id} not found")
        if row[0] != expected:
            raise StaleOrder(f"order {order_id} moved on (version {row[0]}, expected {expected})")
        raise LeaseLost(f"order {order_id} is leased by {row[1]!r}, not {owner!r}")

    # -- leases ----------------------------------------------------------------------

    async def claim(self, *, order_id: uuid.UUID, owner: str) -> Order | None:
        """Take the lease if it is free, expired or already ours; None if someone holds it."""
        return await self.committer.submit(partial(self._claim, order_id, owner, utcnow()))

    def _claim(self, order_id: uuid.UUID, owner: str, now: datetime, cursor: Any) -> Order | None:
        d = self.dialect
        cursor.execute(
            d.sql(
                "UPDATE orders SET lease_owner = %s, lease_expires_at = %s WHERE id = %s AND "
                "(lease_owner IS NULL OR lease_expires_at < %s OR lease_owner = %s) " + d.returning
            ),
            [owner, d.timestamp(now + self.lease), d.uuid(order_id), d.timestamp(now), owner],
        )
        row = cursor.fetchone()
        if row is None:
            cursor.execute(d.sql("SELECT 1 FROM orders WHERE id = %s"), [d.uuid(order_id)])
            if cursor.fetchone() is None:
                raise OrderNotFound(f"order {order_id} not found")
            return None
        try:
            return self.dialect.order(row)
        except CorruptOrder:
            self._release(order_id, owner, cursor)  # never drive what cannot be read
            raise

    async def claim_batch(
        self,
        *,
        owner: str,
        moved_before: datetime,
        limit: int,
        exclude: Collection[uuid.UUID] = (),
        due_only: bool = True,
    ) -> list[Order]:
        """Atomically lease up to `limit` stuck orders, oldest first, in one statement.
        PostgreSQL: FOR UPDATE SKIP LOCKED, so concurrent workers take disjoint batches."""
        op = partial(self._claim_batch, owner, moved_before, limit, tuple(exclude), due_only)
        return await self.committer.submit(op)

    def _claim_batch(
        self,
        owner: str,
        moved_before: datetime,
        limit: int,
        exclude: tuple[uuid.UUID, ...],
        due_only: bool,
        cursor: Any,
    ) -> list[Order]:
        d = self.dialect
        now = d.timestamp(utcnow())
        where = [
            f"state IN ({_RESUMABLE_SQL})",
            "updated_at <= %s",
            "(lease_owner IS NULL OR lease_expires_at < %s)",
        ]
        params: list[Any] = [d.timestamp(moved_before), now]
        if due_only:  # the sweep honours the persisted retry schedule; an operator may not
            where.append("(next_attempt_at IS NULL OR next_attempt_at <= %s)")
            params.append(now)
        if exclude:
            where.append(f"id NOT IN ({', '.join(['%s'] * len(exclude))})")
            params.extend(d.uuid(i) for i in exclude)
        if self.undrivable:  # fsm.upgrade.guard(): what this machine cannot drive stays put
            rows = ", ".join(["(%s, %s, %s, %s)"] * len(self.undrivable))
            where.append(f"({_STATES}) NOT IN (VALUES {rows})")
            params.extend(value for combo in sorted(self.undrivable) for value in combo)
        candidates = (
            f"SELECT id FROM orders WHERE {' AND '.join(where)} "
            f"ORDER BY updated_at LIMIT %s {d.skip_locked}"
        )
        lease = d.timestamp(utcnow() + self.lease)
        cursor.execute(
            d.sql(
                f"UPDATE orders SET lease_owner = %s, lease_expires_at = %s "
                f"WHERE id IN ({candidates}) {d.returning}"
            ),
            [owner, lease, *params, limit],
        )
        return self._usable(cursor.fetchall(), owner, cursor)

    def _usable(self, rows: Sequence[Any], owner: str, cursor: Any) -> list[Order]:
        """Claimed rows a driver can use; a corrupt one is reported, released, never guessed."""
        usable = []
        for row in rows:
            try:
                usable.append(self.dialect.order(row))
            except CorruptOrder as exc:
                log.error("skipping: %s", exc)
                self._release(row[0], owner, cursor, encoded=True)
        return usable

    async def renew(self, *, order_ids: Collection[uuid.UUID], owner: str) -> int:
        """Extend every listed lease `owner` still holds: one statement for all of them."""
        if not order_ids:
            return 0
        return await self.committer.submit(partial(self._renew, tuple(order_ids), owner))

    def _renew(self, order_ids: tuple[uuid.UUID, ...], owner: str, cursor: Any) -> int:
        d = self.dialect
        renewed = 0
        for start in range(0, len(order_ids), 500):  # stay under SQLite's variable limit
            chunk = order_ids[start : start + 500]
            cursor.execute(
                d.sql(
                    "UPDATE orders SET lease_expires_at = %s WHERE lease_owner = %s "
                    f"AND id IN ({', '.join(['%s'] * len(chunk))})"
                ),
                [d.timestamp(utcnow() + self.lease), owner, *(d.uuid(i) for i in chunk)],
            )
            renewed += cursor.rowcount
        return renewed

    async def release(self, *, order_id: uuid.UUID, owner: str, version: int) -> bool:
        """Give the lease back, only if `owner` holds it and the order is still at
        `version` (what the releasing run last wrote or read): a run never releases a
        lease taken over, or an order moved on, since. False if nothing was released."""
        op = partial(self._release, order_id, owner, version=version)
        released: bool = await self.committer.submit(op)
        return released

    def _release(
        self,
        order_id: Any,
        owner: str,
        cursor: Any,
        *,
        version: int | None = None,
        encoded: bool = False,
    ) -> bool:
        d = self.dialect
        guard, params = "", [order_id if encoded else d.uuid(order_id), owner]
        if version is not None:
            guard = " AND version = %s"
            params.append(version)
        cursor.execute(
            d.sql(
                "UPDATE orders SET lease_owner = NULL, lease_expires_at = NULL "
                "WHERE id = %s AND lease_owner = %s" + guard
            ),
            params,
        )
        return bool(cursor.rowcount == 1)

    # -- reads (blocking: API worker threads, the CLI, or asyncio.to_thread) -----------

    def _rows(self, query: Any) -> Sequence[Any]:
        try:
            with self.engine.connect() as conn:
                return conn.execute(query).all()
        except SQLAlchemyOperationalError as exc:
            raise StoreUnavailable(f"database unavailable: {sql.first_line(exc.orig)}") from exc

    def get(self, order_id: uuid.UUID) -> Order:
        rows = self._rows(select(orders).where(orders.c.id == order_id))
        if not rows:
            raise OrderNotFound(f"order {order_id} not found")
        return _order_from(rows[0])

    def find_by_idempotency_key(self, key: str) -> Order | None:
        rows = self._rows(select(orders).where(orders.c.idempotency_key == key))
        return _order_from(rows[0]) if rows else None

    def list_orders(
        self, *, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[Order]:
        query = select(orders).order_by(orders.c.created_at.desc(), orders.c.id)
        if status is not None:
            query = query.where(orders.c.status == status)
        return [_order_from(r) for r in self._rows(query.limit(limit).offset(offset))]

    def history(self, order_id: uuid.UUID) -> list[Transition]:
        query = select(transitions).where(transitions.c.order_id == order_id)
        return [
            Transition(**{**r._mapping, "created_at": sql.as_utc(r.created_at)})
            for r in self._rows(query.order_by(transitions.c.seq))
        ]

    def count_by_status(self) -> dict[str, int]:
        query = select(orders.c.status, func.count()).group_by(orders.c.status)
        return {status: int(n) for status, n in self._rows(query)}

    def _stuck(self, *, moved_before: datetime, now: datetime, due_only: bool) -> Any:
        query = select(orders).where(
            orders.c.state.in_(_RESUMABLE),
            orders.c.updated_at <= moved_before,
            or_(orders.c.lease_owner.is_(None), orders.c.lease_expires_at < now),
        )
        if due_only:
            query = query.where(
                or_(orders.c.next_attempt_at.is_(None), orders.c.next_attempt_at <= now)
            )
        return query

    def find_stuck(
        self, *, moved_before: datetime, limit: int, due_only: bool = True
    ) -> list[Order]:
        """Non-terminal orders, unleased, unmoved since `moved_before` (oldest first);
        with `due_only`, only those whose next retry time has come. Corrupt rows skipped."""
        query = self._stuck(moved_before=moved_before, now=utcnow(), due_only=due_only)
        usable = []
        for row in self._rows(query.order_by(orders.c.updated_at).limit(limit)):
            try:
                usable.append(_order_from(row))
            except CorruptOrder as exc:
                log.error("skipping: %s", exc)
        return usable

    def count_leased_stuck(self, *, moved_before: datetime) -> int:
        """Non-terminal orders that another driver currently holds."""
        query = (
            select(func.count())
            .select_from(orders)
            .where(
                orders.c.state.in_(_RESUMABLE),
                orders.c.updated_at <= moved_before,
                orders.c.lease_owner.is_not(None),
                orders.c.lease_expires_at >= utcnow(),
            )
        )
        return int(self._rows(query)[0][0])


def _order_from(row: Any) -> Order:
    data = dict(row._mapping)
    for key in ("lease_expires_at", "next_attempt_at", "deadline_at", "created_at", "updated_at"):
        data[key] = sql.as_utc(data[key])
    return sql.order_from(data)
