"""The engine's writes and leases: create orders, record transitions under a version and
lease check, claim, renew and release leases. No HTTP, no business decisions, no SQL text
(statements and the row codec are `fsm.sql`'s), no reads (`fsm.queries`, which `Store`
inherits so a holder of the store can read), no connection set-up (`fsm.engine`).

Writes are coroutines: each is an op for the group-commit thread (`fsm.committer`), so the
event loop never waits on the database and concurrent orders share commits.

In-memory contract: a write applies its values to the `Order` when it is *queued*, so the
next write of the same order (a concurrent step's) builds on it; writes of one order commit
in the order they were queued. If a write fails, it and every later write of that order
fail (the version chain breaks), and the caller must stop driving the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Collection, Generator, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Engine

from fsm import outbox, outbox_sql, sql
from fsm.committer import Committer, settled
from fsm.engine import backend, make_engine
from fsm.errors import CorruptOrder, InvalidMove, LeaseLost, OrderNotFound, StaleOrder
from fsm.machine import (
    AUDIT_SCOPE,
    ORDER_MACHINE,
    STEP_MACHINE,
    TERMINAL_ORDER_STATES,
    MachineError,
    OrderState,
    Status,
    coarse_status,
    next_state,
)
from fsm.models import ORDER_COLUMNS, STATE_COLUMN, Order
from fsm.queries import Reads, utcnow
from fsm.text import storable
from fsm.version import MACHINE_VERSION

# make_engine and utcnow re-exported: callers that knew them here keep working.
__all__ = ["STATE_COLUMN", "Store", "make_engine", "step_states", "utcnow"]

log = logging.getLogger("order_saga.store")


def step_states(order: Order) -> dict[str, str]:
    return order.step_states()


class Store(Reads):
    """Orders and their transition log in one SQL database."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: float = 30.0,
        lock_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        max_batch: int = 256,
        commit_linger: float = 0.0,
        event_source: str = "/order-saga",
        synchronous_commit: bool = True,
        max_interruptions: int = 0,
    ) -> None:
        super().__init__(engine)
        # ORDER_SAGA_MAX_INTERRUPTIONS (0: off): the sweep's claim leaves an order its
        # driver died under this many times in a row to an operator (Order.held).
        self.max_interruptions = max_interruptions
        self.event_source = event_source  # the CloudEvents `source` of order events
        self.lease = timedelta(seconds=lease_seconds)
        self.dialect = sql.dialect_of(engine)
        # (state, *step states) combinations (sql.STATE_COLUMNS) the installed machine cannot
        # drive, found at start by fsm.upgrade.guard(): the sweep leaves those orders alone.
        self.undrivable: frozenset[tuple[str, ...]] = frozenset()
        self.committer = Committer(
            backend(
                engine,
                lock_timeout=lock_timeout,
                statement_timeout=statement_timeout,
                synchronous_commit=synchronous_commit,
            ),
            max_batch=max_batch,
            lock_timeout=lock_timeout,
            linger=commit_linger,
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
        created_by: str = "",
    ) -> tuple[Order, bool]:
        """Insert a pending order, already leased to `owner` if given, placed by the key
        `created_by`. With an idempotency key that caller used already, return that order
        instead: (order, created)."""
        now = utcnow()
        order = Order(
            id=uuid.uuid4(),
            idempotency_key=idempotency_key,
            user_id=user_id,
            product_id=product_id,
            quantity=quantity,
            state=OrderState.PENDING.value,
            status=Status.PENDING.value,  # and every step pending (Order's default)
            lease_owner=owner,
            lease_expires_at=now + self.lease if owner else None,
            created_at=now,
            updated_at=now,
            machine_version=MACHINE_VERSION,
            created_by=created_by,
        )
        event = self._event(order, 0, outbox.event_type(None, order.status), now)
        return await self.committer.submit(partial(self._insert, order, event), key=order.id)

    def _insert(
        self, order: Order, event: outbox_sql.EventRow | None, cursor: Any
    ) -> Generator[None, None, tuple[Order, bool]]:
        d = self.dialect
        values = [d.encode(c, getattr(order, c)) for c in ORDER_COLUMNS]
        if event is not None and d.moves_in_one_statement:
            cursor.execute(outbox_sql.create_with_event(ORDER_COLUMNS), [*values, *event.params])
        else:
            cursor.execute(sql.insert_order(d), values)
        yield  # (a committer op: statements sent, results next)
        if cursor.rowcount == 1:
            if event is not None and not d.moves_in_one_statement:
                outbox_sql.write_event(d, cursor, event)
            return order, True
        # A unique conflict: the key was used before, or (a retried batch whose first
        # commit's answer was lost) this very row is already there.
        cursor.execute(sql.select_order(d, "id"), [d.encode("id", order.id)])
        row = cursor.fetchone()
        if row is not None:
            return d.order(row), True
        if order.idempotency_key is not None:  # unique per caller (issue 17)
            key = [d.encode("created_by", order.created_by), order.idempotency_key]
            cursor.execute(sql.select_order_by_key(d), key)
            row = cursor.fetchone()
            if row is not None:
                return d.order(row), False
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
        if order.interruptions:  # progress: the crash loop, if any, is over (written
            values["interruptions"] = 0  # only then: the hot path's UPDATE stays as narrow)
        kind = None
        if scope == "order":
            values["status"] = coarse_status(dest).value
            kind = outbox.event_type(order.status, values["status"])
            if dest in TERMINAL_ORDER_STATES:
                values["lease_owner"] = values["lease_expires_at"] = None
        line = (
            order.id, seq, scope, trigger, source, dest, detail, now, MACHINE_VERSION,
            order.created_at,
        )  # fmt: skip
        await self._write(order, owner, values, line, kind)
        return dest

    async def record_audit(
        self, *, order: Order, owner: str, action: str, detail: dict[str, Any]
    ) -> None:
        """An operator's action (who, why, through what) as its own row of the log, scope
        AUDIT_SCOPE and from = to (not a move), under the same version and lease guard as
        a transition. A person acting on the order restarts its count of interruptions:
        theirs is the decision that the cause is fixed (a held order is driven again).
        Raises StaleOrder or LeaseLost (nothing written)."""
        now = utcnow()
        seq = order.version + 1
        values: dict[str, Any] = {"version": seq, "lease_expires_at": now + self.lease}
        if order.interruptions:
            values["interruptions"] = 0
        line = (
            order.id, seq, AUDIT_SCOPE, action, order.state, order.state, detail, now,
            MACHINE_VERSION, order.created_at,
        )  # fmt: skip
        await self._write(order, owner, values, line)

    def _event(
        self, order: Order, seq: int, kind: str | None, now: datetime
    ) -> outbox_sql.EventRow | None:
        """The event row of this write (the order as it is once the write is applied)."""
        if kind is None:
            return None
        d = self.dialect
        body = outbox.cloud_event(order, seq=seq, type_=kind, at=now, source=self.event_source)
        return outbox_sql.EventRow(
            params=(
                outbox.event_id(order.id, seq),
                d.uuid(order.id),
                seq,
                kind,
                d.timestamp(now),
                body,
            )
        )

    async def note_attempt(
        self,
        *,
        order: Order,
        owner: str,
        call: str,
        error: str | None,
        next_attempt_at: datetime | None,
        waiting_on: str | None = None,
    ) -> None:
        """Persist the retry schedule of one call (count, last error, next attempt) and log
        the attempt in `attempts` (the failure path only). `waiting_on`: the call did not
        fail but waits for that service's open breaker (no attempt spent; next = probe).
        `error` is stored as `fsm.text.storable` makes it (one line, capped, encodable):
        the write never fails on what a message quotes."""
        n = order.attempts.get(call, 0) + (0 if waiting_on else 1)
        error = None if error is None else storable(error)
        values: dict[str, Any] = {"last_error": error, "next_attempt_at": next_attempt_at}
        if not waiting_on:
            values["attempts"] = {**order.attempts, call: n}
        logged = (order.id, utcnow(), call, n, error, next_attempt_at, waiting_on)
        await self._write(order, owner, values, None, attempt=logged)

    async def start_run(self, *, order: Order, owner: str) -> None:
        """A run starts: the last run's retry time (`next_attempt_at`: a failed attempt's,
        a breaker's probe, a park's pause) is spent, since the sweep found it due or an
        operator overrides it. Cleared, `fsm.why` no longer reads "waits until then" while
        this run calls; a wait of this run sets it again. Not part of the claim, which an
        action refused under the lease (`operator.admit`) must leave unwritten."""
        if order.next_attempt_at is not None:
            await self._write(order, owner, {"next_attempt_at": None}, None)

    async def _write(
        self,
        order: Order,
        owner: str,
        values: dict[str, Any],
        line: tuple[Any, ...] | None,
        kind: str | None = None,
        *,
        attempt: tuple[Any, ...] | None = None,
    ) -> None:
        expected = order.version
        before = {key: getattr(order, key) for key in values}
        for key, value in values.items():  # queued: the next write builds on it
            setattr(order, key, value)
        event = self._event(order, order.version, kind, order.updated_at) if line else None
        op = partial(self._guarded, order.id, expected, owner, values, line, event, attempt)
        # A batch retried after its connection was lost may have committed this write: the
        # retry looks for it before calling the moved version a conflict.
        after_loss = partial(op, retried=True) if line is not None else None
        future = self.committer.submit(op, key=order.id, after_loss=after_loss)
        try:
            await settled(future)  # cancelled (SIGTERM) or not: what the database holds
        except BaseException:
            if _failed(future) and order.version == values.get("version", expected):
                # nothing queued on top
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
        event: outbox_sql.EventRow | None,
        attempt: tuple[Any, ...] | None,
        cursor: Any,
        *,
        retried: bool = False,
    ) -> Generator[None, None, None]:
        """The write of `_write`: refused (StaleOrder, LeaseLost) unless the order is at
        `expected` and leased to `owner`. `retried`: the committer runs it again after
        losing the connection during its batch, whose commit may have gone through
        unheard; then the order already at `expected + 1` with this very line at that
        seq in the log is this write, committed (as `_insert` finds its own row)."""
        d = self.dialect
        columns = tuple(values)
        params = [*(d.encode(c, values[c]) for c in columns), d.uuid(order_id), expected, owner]
        logged = (
            [d.encode(c, v) for c, v in zip(sql.TRANSITION_COLUMNS, line, strict=True)]
            if line is not None
            else None
        )
        if logged is not None and d.moves_in_one_statement:
            if event is None:
                cursor.execute(sql.guarded_move(d, columns), [*params, *logged])
            else:
                cursor.execute(
                    outbox_sql.move_with_event(columns),
                    [*params, *logged, *event.params],
                )
            yield  # (a committer op: statements sent, results next)
            if cursor.rowcount != 1:
                if retried and self._committed_before(cursor, order_id, expected, owner, logged):
                    return
                self._raise_conflict(cursor, order_id, expected, owner)
            return
        cursor.execute(sql.guarded_update(d, columns), params)
        yield
        if cursor.rowcount != 1:
            if (
                retried
                and logged is not None
                and self._committed_before(cursor, order_id, expected, owner, logged)
            ):
                return
            self._raise_conflict(cursor, order_id, expected, owner)
        if logged is not None:
            cursor.execute(sql.insert_transition(d), logged)
        if event is not None:
            outbox_sql.write_event(d, cursor, event)
        if attempt is not None:
            row = [d.encode(c, v) for c, v in zip(sql.ATTEMPT_COLUMNS, attempt, strict=True)]
            cursor.execute(sql.insert_attempt(d), row)

    def _committed_before(
        self, cursor: Any, order_id: uuid.UUID, expected: int, owner: str, logged: list[Any]
    ) -> bool:
        """Is the order past `expected`, still leased to `owner`, with `logged` (its scope,
        trigger and new state) at seq `expected + 1` of its log? Then the write was
        committed by the batch whose answer was lost (a later write of the same order in
        that batch may have moved it further: steps write side by side). Only on that
        retry: the hot path never asks."""
        line = dict(zip(sql.TRANSITION_COLUMNS, logged, strict=True))
        cursor.execute(sql.select_lease(self.dialect), [self.dialect.uuid(order_id)])
        row = cursor.fetchone()
        if row is None or row[0] < expected + 1 or row[1] != owner:
            return False
        key = [line["order_id"], line["seq"], line["order_created_at"]]
        cursor.execute(sql.select_logged(self.dialect), key)
        found = cursor.fetchone()
        return found is not None and tuple(found) == (
            line["scope"],
            line["trigger"],
            line["to_state"],
        )

    def _raise_conflict(self, cursor: Any, order_id: uuid.UUID, expected: int, owner: str) -> None:
        d = self.dialect
        cursor.execute(sql.select_lease(d), [d.uuid(order_id)])
        row = cursor.fetchone()
        if row is None:
            raise OrderNotFound(f"order {order_id} not found")
        if row[0] != expected:
            raise StaleOrder(f"order {order_id} moved on (version {row[0]}, expected {expected})")
        raise LeaseLost(f"order {order_id} is leased by {row[1]!r}, not {owner!r}")

    async def probe(self) -> None:
        """A transaction through the writer that writes nothing (SQLite: it still takes
        the write lock): raises what a write would meet now (lock, refusal, read-only)."""
        await self.committer.submit(_probe)

    # -- leases ----------------------------------------------------------------------

    async def claim(self, *, order_id: uuid.UUID, owner: str) -> Order | None:
        """Take the lease if it is free, expired or already ours; None if someone holds it.
        Cancelled meanwhile (SIGTERM), a lease it took is given back before it returns."""
        future = self.committer.submit(
            partial(self._claim, order_id, owner, utcnow()), key=order_id
        )
        try:
            return await settled(future)
        except asyncio.CancelledError:
            if not _failed(future) and (order := future.result()) is not None:
                await self.give_back([order], owner)
            raise

    def _claim(self, order_id: uuid.UUID, owner: str, now: datetime, cursor: Any) -> Order | None:
        d = self.dialect
        at = d.timestamp(now)
        cursor.execute(
            sql.claim(d),
            [owner, d.timestamp(now + self.lease), owner, at, d.uuid(order_id), at, owner],
        )
        row = cursor.fetchone()
        if row is None:
            cursor.execute(sql.order_exists(d), [d.uuid(order_id)])
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
        take_held: bool = False,
        suspects: bool | None = None,
    ) -> list[Order]:
        """Atomically lease up to `limit` stuck orders, oldest first, in one statement.
        PostgreSQL: FOR UPDATE SKIP LOCKED, so concurrent workers take disjoint batches.
        Held orders (Order.held) only with `take_held` (a person's `resume --include-held`);
        `suspects` True: only orders whose driver died under them fsm.sql.SUSPECT times in
        a row, False: none of those, None: whichever."""
        op = partial(
            self._claim_batch,
            owner,
            moved_before,
            limit,
            tuple(exclude),
            due_only,
            take_held,
            suspects,
        )
        future = self.committer.submit(op)
        try:
            return await settled(future)
        except asyncio.CancelledError:  # nobody will drive what it took: give it back
            if not _failed(future):
                await self.give_back(future.result(), owner)
            raise

    async def give_back(self, orders: Sequence[Order], owner: str) -> None:
        """Release leases just claimed, for a caller cancelled before it could drive them
        (handed back: the next sweep takes them at once)."""
        releases = [
            self.committer.submit(
                partial(self._release, order.id, owner, version=order.version, handed_back=True),
                key=order.id,
            )
            for order in orders
        ]  # all queued at once: they commit even if this wait is cut short
        for release in releases:
            with contextlib.suppress(BaseException):  # else the lease expires on its own
                await settled(release)

    def _claim_batch(
        self,
        owner: str,
        moved_before: datetime,
        limit: int,
        exclude: tuple[uuid.UUID, ...],
        due_only: bool,
        take_held: bool,
        suspects: bool | None,
        cursor: Any,
    ) -> list[Order]:
        d = self.dialect
        now = d.timestamp(utcnow())
        held = self.max_interruptions > 0 and not take_held  # left out: held ones
        params: list[Any] = [owner, d.timestamp(utcnow() + self.lease), owner, now]
        params += [d.timestamp(moved_before), now, *([now] if due_only else [])]
        params += [self.max_interruptions] if held else []
        params.extend(d.uuid(i) for i in exclude)
        params.extend(value for combo in sorted(self.undrivable) for value in combo)
        statement = sql.claim_batch(
            d,
            due_only=due_only,
            excluded=len(exclude),
            undrivable=len(self.undrivable),
            held=held,
            suspects=suspects,
        )
        cursor.execute(statement, [*params, limit])
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
                sql.renew(d, len(chunk)),
                [d.timestamp(utcnow() + self.lease), owner, *(d.uuid(i) for i in chunk)],
            )
            renewed += cursor.rowcount
        return renewed

    async def release(
        self, *, order_id: uuid.UUID, owner: str, version: int, handed_back: bool = False
    ) -> bool:
        """Give the lease back, only if `owner` holds it and the order is still at
        `version` (what the releasing run last wrote or read): a run never releases a
        lease taken over, or an order moved on, since. False if nothing was released.
        `handed_back`: by a run that was stopped (cancelled), so the sweep takes the order
        at once (fsm.sql.HANDED_BACK) instead of once it has been still for a while."""
        op = partial(self._release, order_id, owner, version=version, handed_back=handed_back)
        released: bool = await self.committer.submit(op, key=order_id)
        return released

    def _release(
        self,
        order_id: Any,
        owner: str,
        cursor: Any,
        *,
        version: int | None = None,
        encoded: bool = False,
        handed_back: bool = False,
    ) -> bool:
        d = self.dialect
        at = d.timestamp(utcnow()) if handed_back else None
        params = [at, order_id if encoded else d.uuid(order_id), owner]
        if version is not None:
            params.append(version)
        cursor.execute(sql.release(d, at_version=version is not None), params)
        return bool(cursor.rowcount == 1)


def _failed(future: asyncio.Future[Any]) -> bool:
    """Did this submitted write not commit (or is its outcome unknown)?"""
    return not future.done() or future.cancelled() or future.exception() is not None


def _probe(cursor: Any) -> None:
    cursor.execute(sql.PROBE)


_probe.probe = True  # type: ignore[attr-defined]  # (the committer: not a write)
