"""All SQL of the orchestrator: create orders, record transitions under a version and lease
check, claim and release leases, find stuck orders. No HTTP, no business decisions.

The hot path (`record_transition`) is one short transaction on a pooled connection: a
guarded UPDATE of the order row and an INSERT into the append-only log, both Core
statements; SQLModel only defines the tables.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from fsm.errors import CorruptOrder, InvalidMove, LeaseLost, OrderNotFound, StaleOrder
from fsm.machine import (
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
from fsm.models import Order, Transition

log = logging.getLogger("order_saga.store")
orders = Order.__table__  # type: ignore[attr-defined]
transitions = Transition.__table__  # type: ignore[attr-defined]

STATE_COLUMN = {
    "order": "state",
    "payment": "payment_state",
    "inventory": "inventory_state",
    "shipping": "shipping_state",
}
# Orders the sweep may pick up: a known, non-terminal state (a corrupt row never matches).
_RESUMABLE = [s.value for s in OrderState if s not in TERMINAL_ORDER_STATES]
_KNOWN = {
    "state": {s.value for s in OrderState},
    "status": {s.value for s in Status},
    **{
        f"{step}_state": {s.value for s in StepState}
        for step in ("payment", "inventory", "shipping")
    },
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were written as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def make_engine(url: str) -> Engine:
    """An engine with the pragmas the saga relies on (SQLite: WAL, wait on locks)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # No pre-ping: it would add a round trip to every transition; recycle instead.
    return create_engine(url, pool_recycle=1800, pool_size=10, max_overflow=10)


# Hot-path statements are built once (per set of columns) and executed with parameters:
# rebuilding them per call costs more than the SQL itself.
_INSERT_TRANSITION = insert(transitions)


@lru_cache(maxsize=64)
def _guarded_update(columns: tuple[str, ...]) -> Any:
    """UPDATE orders SET <columns> WHERE id, version and lease owner match."""
    return (
        update(orders)
        .where(
            orders.c.id == bindparam("_id"),
            orders.c.version == bindparam("_version"),
            orders.c.lease_owner == bindparam("_owner"),
        )
        .values({column: bindparam(column) for column in columns})
    )


def _order_from(row: Any) -> Order:
    """The row as an Order; a state no machine knows raises CorruptOrder (never guessed)."""
    data = dict(row._mapping)
    for column, known in _KNOWN.items():
        if data[column] not in known:
            raise CorruptOrder(
                f"order {data['id']} is corrupt: {column} = {data[column]!r} "
                f"is not one of the machine's states"
            )
    if not isinstance(data["attempts"], dict):
        raise CorruptOrder(f"order {data['id']} is corrupt: attempts is not a JSON object")
    for key in ("lease_expires_at", "next_attempt_at", "deadline_at", "created_at", "updated_at"):
        data[key] = as_utc(data[key])
    return Order(**data)


def _usable(rows: Sequence[Any]) -> list[Order]:
    """Rows a sweep can drive; a corrupt one is reported and left as it is, not guessed."""
    usable = []
    for row in rows:
        try:
            usable.append(_order_from(row))
        except CorruptOrder as exc:
            log.error("skipping: %s", exc)
    return usable


class Store:
    """Orders and their transition log in one SQL database."""

    def __init__(self, engine: Engine, *, lease_seconds: float = 30.0) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)
        self.is_postgres = engine.dialect.name == "postgresql"

    # -- orders ----------------------------------------------------------------------

    def create_order(
        self,
        *,
        user_id: int,
        product_id: int,
        quantity: int,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> tuple[Order, bool]:
        """Insert a pending order (leased to `owner` if given). With an idempotency key
        already used, return that order instead: (order, created)."""
        now = utcnow()
        values: dict[str, Any] = {
            "id": uuid.uuid4(),
            "idempotency_key": idempotency_key,
            "user_id": user_id,
            "product_id": product_id,
            "quantity": quantity,
            "amount": None,
            "state": OrderState.PENDING.value,
            "status": Status.PENDING.value,
            "payment_state": StepState.PENDING.value,
            "inventory_state": StepState.PENDING.value,
            "shipping_state": StepState.PENDING.value,
            "version": 0,
            "lease_owner": owner,
            "lease_expires_at": now + self.lease if owner else None,
            "attempts": {},
            "cancel_requested": False,
            "created_at": now,
            "updated_at": now,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(orders).values(**values))
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.find_by_idempotency_key(idempotency_key)
            if existing is None:
                raise
            return existing, False
        return self.get(values["id"]), True

    def get(self, order_id: uuid.UUID) -> Order:
        with self.engine.connect() as conn:
            row = conn.execute(select(orders).where(orders.c.id == order_id)).first()
        if row is None:
            raise OrderNotFound(f"order {order_id} not found")
        return _order_from(row)

    def find_by_idempotency_key(self, key: str) -> Order | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(orders).where(orders.c.idempotency_key == key)).first()
        return _order_from(row) if row else None

    def list_orders(
        self, *, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[Order]:
        query = select(orders).order_by(orders.c.created_at.desc(), orders.c.id)
        if status is not None:
            query = query.where(orders.c.status == status)
        with self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit).offset(offset)).all()
        return [_order_from(r) for r in rows]

    def history(self, order_id: uuid.UUID) -> list[Transition]:
        query = select(transitions).where(transitions.c.order_id == order_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(transitions.c.seq)).all()
        return [Transition(**{**r._mapping, "created_at": as_utc(r.created_at)}) for r in rows]

    # -- the hot path ----------------------------------------------------------------

    def record_transition(
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
        line in one transaction guarded by version and lease. Updates `order` in memory
        only after the commit; returns the new state. Raises InvalidMove, StaleOrder or
        LeaseLost (nothing is written then)."""
        column = STATE_COLUMN[scope]
        source = getattr(order, column)
        machine = ORDER_MACHINE if scope == "order" else STEP_MACHINE
        try:
            dest = next_state(machine, source, trigger)
        except MachineError as exc:
            raise InvalidMove(f"{scope}: cannot {trigger} from {source}") from exc
        now = utcnow()
        new_version = order.version + 1
        values: dict[str, Any] = {
            column: dest,
            "version": new_version,
            "updated_at": now,
            "lease_expires_at": now + self.lease,
            **changes,
        }
        if scope == "order":
            values["status"] = coarse_status(dest).value
        row = {
            "order_id": order.id,
            "seq": new_version,
            "scope": scope,
            "trigger": trigger,
            "from_state": source,
            "to_state": dest,
            "detail": detail,
            "created_at": now,
        }
        self._write(order=order, owner=owner, values=values, log=row)
        return dest

    def note_attempt(
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
        self._write(order=order, owner=owner, values=values)

    def _write(
        self, *, order: Order, owner: str, values: dict[str, Any], log: dict[str, Any] | None = None
    ) -> None:
        """One transaction: the guarded UPDATE, then (for a transition) its log line.
        `order` is updated in memory only once the commit succeeded."""
        with self.engine.begin() as conn:
            result = conn.execute(
                _guarded_update(tuple(sorted(values))),
                {**values, "_id": order.id, "_version": order.version, "_owner": owner},
            )
            if result.rowcount != 1:
                self._raise_conflict(conn, order, owner)
            if log is not None:
                conn.execute(_INSERT_TRANSITION, log)
        for key, value in values.items():
            setattr(order, key, value)

    @staticmethod
    def _raise_conflict(conn: Any, order: Order, owner: str) -> None:
        row = conn.execute(
            select(orders.c.version, orders.c.lease_owner).where(orders.c.id == order.id)
        ).first()
        if row is None:
            raise OrderNotFound(f"order {order.id} not found")
        if row.version != order.version:
            raise StaleOrder(
                f"order {order.id} moved on (version {row.version}, expected {order.version})"
            )
        raise LeaseLost(f"order {order.id} is leased by {row.lease_owner!r}, not {owner!r}")

    # -- leases ----------------------------------------------------------------------

    def _lease_free(self, now: datetime, owner: str) -> Any:
        return or_(
            orders.c.lease_owner.is_(None),
            orders.c.lease_expires_at < now,
            orders.c.lease_owner == owner,
        )

    def claim(self, *, order_id: uuid.UUID, owner: str) -> Order | None:
        """Take the lease if it is free, expired or already ours; None if someone holds it."""
        now = utcnow()
        with self.engine.begin() as conn:
            result = conn.execute(
                update(orders)
                .where(orders.c.id == order_id, self._lease_free(now, owner))
                .values(lease_owner=owner, lease_expires_at=now + self.lease)
            )
            if result.rowcount != 1:
                exists = conn.execute(select(orders.c.id).where(orders.c.id == order_id)).first()
                if exists is None:
                    raise OrderNotFound(f"order {order_id} not found")
                return None
            row = conn.execute(select(orders).where(orders.c.id == order_id)).one()
        return _order_from(row)

    def renew(self, *, order_id: uuid.UUID, owner: str) -> bool:
        now = utcnow()
        with self.engine.begin() as conn:
            result = conn.execute(
                update(orders)
                .where(orders.c.id == order_id, orders.c.lease_owner == owner)
                .values(lease_expires_at=now + self.lease)
            )
        return result.rowcount == 1

    def release(self, *, order_id: uuid.UUID, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(orders)
                .where(orders.c.id == order_id, orders.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    # -- recovery --------------------------------------------------------------------

    def _stuck(
        self,
        *,
        moved_before: datetime,
        now: datetime,
        exclude: Collection[uuid.UUID] = (),
        due_only: bool = True,
    ) -> Any:
        query = select(orders).where(
            orders.c.state.in_(_RESUMABLE),
            orders.c.updated_at <= moved_before,
            or_(orders.c.lease_owner.is_(None), orders.c.lease_expires_at < now),
        )
        if due_only:  # the sweep honours the persisted retry schedule; an operator may not
            query = query.where(
                or_(orders.c.next_attempt_at.is_(None), orders.c.next_attempt_at <= now)
            )
        return query.where(orders.c.id.not_in(list(exclude))) if exclude else query

    def find_stuck(
        self,
        *,
        moved_before: datetime,
        limit: int,
        exclude: Collection[uuid.UUID] = (),
        due_only: bool = True,
    ) -> list[Order]:
        """Non-terminal orders, unleased, unmoved since `moved_before` (oldest first);
        with `due_only`, only those whose next retry time has come."""
        query = self._stuck(
            moved_before=moved_before, now=utcnow(), exclude=exclude, due_only=due_only
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(orders.c.updated_at).limit(limit)).all()
        return _usable(rows)

    def count_leased_stuck(self, *, moved_before: datetime) -> int:
        """Non-terminal orders that another driver currently holds."""
        now = utcnow()
        query = (
            select(func.count())
            .select_from(orders)
            .where(
                orders.c.state.in_(_RESUMABLE),
                orders.c.updated_at <= moved_before,
                orders.c.lease_owner.is_not(None),
                orders.c.lease_expires_at >= now,
            )
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def claim_batch(
        self,
        *,
        owner: str,
        moved_before: datetime,
        limit: int,
        exclude: Collection[uuid.UUID] = (),
        due_only: bool = True,
    ) -> list[Order]:
        """Atomically lease up to `limit` stuck orders. PostgreSQL: FOR UPDATE SKIP LOCKED,
        so concurrent workers take disjoint batches; SQLite: one guarded UPDATE each."""
        now = utcnow()
        if self.is_postgres:
            query = (
                self._stuck(moved_before=moved_before, now=now, exclude=exclude, due_only=due_only)
                .order_by(orders.c.updated_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            with self.engine.begin() as conn:
                batch = _usable(conn.execute(query).all())
                if not batch:
                    return []
                expires = now + self.lease
                conn.execute(
                    update(orders)
                    .where(orders.c.id.in_([o.id for o in batch]))
                    .values(lease_owner=owner, lease_expires_at=expires)
                )
            for leased in batch:
                leased.lease_owner, leased.lease_expires_at = owner, expires
            return batch
        claimed: list[Order] = []
        for candidate in self.find_stuck(
            moved_before=moved_before, limit=limit, exclude=exclude, due_only=due_only
        ):
            order = self._claim_if_stuck(candidate, owner=owner, now=now)
            if order is not None:
                claimed.append(order)
        return claimed

    def _claim_if_stuck(self, candidate: Order, *, owner: str, now: datetime) -> Order | None:
        with self.engine.begin() as conn:
            result = conn.execute(
                update(orders)
                .where(
                    orders.c.id == candidate.id,
                    orders.c.version == candidate.version,
                    or_(orders.c.lease_owner.is_(None), orders.c.lease_expires_at < now),
                )
                .values(lease_owner=owner, lease_expires_at=now + self.lease)
            )
            if result.rowcount != 1:
                return None
            row = conn.execute(select(orders).where(orders.c.id == candidate.id)).one()
        return _order_from(row)

    def count_by_status(self) -> dict[str, int]:
        query = select(orders.c.status, func.count()).group_by(orders.c.status)
        with self.engine.connect() as conn:
            return {status: int(n) for status, n in conn.execute(query).all()}


def step_states(order: Order) -> dict[str, str]:
    return {scope: getattr(order, col) for scope, col in STATE_COLUMN.items() if scope != "order"}
