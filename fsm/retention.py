"""Retention: delete terminal orders past their time (or beyond the newest N) with their
transitions, in small short transactions, archiving each first (`fsm.archive`). Used by
`order-saga prune` and by the background pass of `serve` and `worker`.

What it must never do: delete an order that is not terminal (a parked `needs_attention`
one included), one someone holds the lease of (a cancel or resolve under way), one with
order events not yet delivered (`undelivered_events`, the hook for the outbox), or one
placed with an Idempotency-Key less than IDEMPOTENCY_WINDOW ago (the key lives only in its
order's row: deleted, a retried POST would place and charge a second order); delete an
order without its transitions or the other way round (one transaction per batch, so a kill
at any point leaves each order whole or gone); delete before its archive line is fsynced.

A batch reads its candidates without locks, archives them, then in one transaction locks
the rows that are *still* eligible and unchanged (same version: the archived copy is the
deleted one), deletes their transitions and then them. On SQLite that transaction takes the
write lock up front (BEGIN IMMEDIATE) and holds it for two DELETEs; on PostgreSQL the rows
are locked FOR UPDATE SKIP LOCKED, so a row the engine is writing is left for next time.
One process prunes at a time on PostgreSQL (a session advisory lock); SQLite's single
writer makes a second pruner harmless (it finds nothing left to delete).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, and_, func, or_, select, tuple_
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement

from fsm import archive, partitions, sql
from fsm.errors import CorruptOrder, outage, outage_line
from fsm.machine import TERMINAL_ORDER_STATES, coarse_status
from fsm.models import (
    AttemptTable,
    EventDestinationTable,
    Order,
    OrderTable,
    OutboxCursorTable,
    OutboxDeliveryTable,
    OutboxEventTable,
    Transition,
    TransitionTable,
)
from fsm.queries import ORDER_ROW, TRANSITION_ROW, order_of_row, transition_of_row
from fsm.settings import Settings
from fsm.sql import as_utc

log = logging.getLogger("order_saga.retention")
orders = OrderTable.__table__  # type: ignore[attr-defined]
transitions = TransitionTable.__table__  # type: ignore[attr-defined]
events = OutboxEventTable.__table__  # type: ignore[attr-defined]
deliveries = OutboxDeliveryTable.__table__  # type: ignore[attr-defined]
cursors = OutboxCursorTable.__table__  # type: ignore[attr-defined]
destinations = EventDestinationTable.__table__  # type: ignore[attr-defined]
attempts = AttemptTable.__table__  # type: ignore[attr-defined]

_TERMINAL_STATES = sorted(s.value for s in TERMINAL_ORDER_STATES)
_TERMINAL_STATUSES = sorted({coarse_status(s).value for s in TERMINAL_ORDER_STATES})
T = TypeVar("T")
# pg_try_advisory_lock key of the pruner: "order-saga retention" in 63 bits.
ADVISORY_KEY = 0x6F72_6465_7273_6167 & 0x7FFF_FFFF_FFFF_FFFF
# How long a client may retry a POST with the same Idempotency-Key and get the same order
# (Stripe keeps keys 24 h): an order placed with a key is kept at least this long after its
# creation, whatever --older-than / RETENTION_SECONDS / --keep say.
IDEMPOTENCY_WINDOW = timedelta(hours=24)


def undelivered_events() -> ColumnElement[bool] | None:
    """The transactional outbox's condition (issue 19): true when the order still has an
    event some destination's cursor has not passed (pending or in flight), or an exception
    row not delivered (retried later, held, or dead-lettered) to a destination that still
    exists (a removed one's rows are owed to nobody: left behind by a removal that raced a
    relay's settle before 1073153, they kept their orders for good)."""
    unfinished = (
        select(deliveries.c.event_id)
        .where(
            deliveries.c.order_id == orders.c.id,
            deliveries.c.state != "delivered",
            deliveries.c.destination_id.in_(select(destinations.c.id)),
        )
        .exists()
    )
    not_passed = (
        select(events.c.id)
        .select_from(
            events.join(
                cursors,
                or_(
                    events.c.txid > cursors.c.txid,
                    and_(events.c.txid == cursors.c.txid, events.c.position > cursors.c.position),
                ),
            )
        )
        .where(events.c.order_id == orders.c.id)
        .exists()
    )
    return or_(unfinished, not_passed)


def key_held(now: datetime) -> ColumnElement[bool]:
    """True for an order whose Idempotency-Key a client may still retry with: placed with
    one less than IDEMPOTENCY_WINDOW ago."""
    return and_(
        orders.c.idempotency_key.is_not(None),
        orders.c.created_at > now - IDEMPOTENCY_WINDOW,
    )


def eligible(*, cutoff: datetime, now: datetime) -> list[ColumnElement[bool]]:
    """THE definition of a prunable order, as conditions over `orders`: terminal (by state
    and by status, so a corrupt row never matches), its terminal move at or before `cutoff`,
    nobody holding its lease, no undelivered order events, and no Idempotency-Key still
    within its window (`key_held`)."""
    return [*_eligible_but_for_the_key(cutoff=cutoff, now=now), ~key_held(now)]


def _eligible_but_for_the_key(*, cutoff: datetime, now: datetime) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        orders.c.status.in_(_TERMINAL_STATUSES),
        orders.c.state.in_(_TERMINAL_STATES),
        orders.c.updated_at <= cutoff,
        or_(orders.c.lease_owner.is_(None), orders.c.lease_expires_at < now),
    ]
    pending_events = undelivered_events()
    if pending_events is not None:
        conditions.append(~pending_events)
    return conditions


def cutoff_of(
    conn: Connection, *, older_than: float | None, keep_rows: int | None, now: datetime
) -> datetime | None:
    """The newest `updated_at` a prunable order may have: older than `older_than` seconds,
    or beyond the newest `keep_rows` terminal orders, whichever reaches further; None when
    neither selects anything."""
    candidates: list[datetime] = []
    if older_than is not None:
        candidates.append(now - timedelta(seconds=older_than))
    if keep_rows is not None:
        boundary = conn.execute(
            select(orders.c.updated_at)
            .where(orders.c.status.in_(_TERMINAL_STATUSES))
            .order_by(orders.c.updated_at.desc())
            .limit(1)
            .offset(keep_rows)
        ).scalar()
        if boundary is not None:
            candidates.append(as_utc(boundary) or boundary)
    return max(candidates) if candidates else None


@dataclass
class PruneSummary:
    eligible: int = 0  # found eligible (what a dry run would delete)
    deleted: int = 0
    transitions: int = 0  # transition rows deleted with them
    archived: int = 0
    changed: int = 0  # archived, then moved or claimed before the delete: kept
    key_held: int = 0  # eligible but for an Idempotency-Key still in its window: kept
    batches: int = 0
    partitions: int = 0  # PostgreSQL: past days of the log dropped whole (fsm.partitions)
    seconds: float = 0.0
    archive: str | None = None
    ids: list[str] = field(default_factory=list)  # dry run: the first ones found

    def line(self) -> str:
        text = (
            f"deleted {self.deleted} orders and {self.transitions} transitions "
            f"in {self.batches} batches ({self.seconds:.1f}s)"
        )
        if self.partitions:
            text += f", {self.partitions} partitions of the log dropped whole"
        if self.archive:
            text += f", archived {self.archived} to {self.archive}"
        if self.changed:
            text += f", {self.changed} changed meanwhile and kept"
        if self.key_held:
            text += f", {self.key_held} {held_line()}"
        return text

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "ids" or v}


def held_line() -> str:
    """What the orders kept for their idempotency keys are (after their number)."""
    hours = IDEMPOTENCY_WINDOW.total_seconds() / 3600
    return (
        f"kept: placed with an Idempotency-Key less than {hours:g}h ago "
        "(a retry must find its order)"
    )


CrashHook = Callable[[str], None]


def crash_hook(crash_after: str | None) -> CrashHook:
    """Test hook: "prune:<point>" SIGKILLs this process at that point of a batch."""

    def hook(point: str) -> None:
        if crash_after == f"prune:{point}":
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class Pruner:
    """Deletes eligible orders batch by batch on one connection of `engine`."""

    def __init__(
        self,
        engine: Engine,
        *,
        older_than: float | None,
        keep_rows: int | None = None,
        batch: int = 200,
        appender: Callable[[], archive.Appender] | None = None,
        crash: CrashHook | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock or _now  # injectable: tests pin "now" to place the cutoff
        self.older_than = older_than
        self.keep_rows = keep_rows
        self.batch = batch
        self._appender_factory = appender
        self._appender: archive.Appender | None = None
        self.crash = crash or (lambda point: None)
        self.summary = PruneSummary()

    # -- the whole run -------------------------------------------------------------------

    def count(self, *, show: int = 20) -> PruneSummary:
        """Dry run: how many are eligible now (and the first ids), nothing deleted."""
        now = self.clock()
        with self.engine.connect() as conn:
            cut = cutoff_of(conn, older_than=self.older_than, keep_rows=self.keep_rows, now=now)
            if cut is not None:
                where = eligible(cutoff=cut, now=now)
                self.summary.eligible = int(
                    conn.execute(select(func.count()).select_from(orders).where(*where)).scalar()
                    or 0
                )
                ids = conn.execute(
                    select(orders.c.id).where(*where).order_by(orders.c.updated_at).limit(show)
                )
                self.summary.ids = [str(i) for (i,) in ids]
                self.summary.key_held = self._count_key_held(conn, cut, now)
        return self.summary

    def _count_key_held(self, conn: Connection, cut: datetime, now: datetime) -> int:
        """How many orders would go now but for their Idempotency-Key (`key_held`)."""
        where = [*_eligible_but_for_the_key(cutoff=cut, now=now), key_held(now)]
        return int(
            conn.execute(select(func.count()).select_from(orders).where(*where)).scalar() or 0
        )

    def run(self, *, pause: float = 0.0) -> PruneSummary:
        """Batches until nothing eligible is left; `pause` x each batch's time between them."""
        started = time.perf_counter()
        with self.session() as conn:
            if conn is None:
                log.info("prune: another process is pruning; skipped")
                return self.summary
            self.drop_partitions(conn)
            while True:
                began = time.perf_counter()
                if not self.one_batch(conn):
                    break
                if pause:
                    time.sleep(pause * (time.perf_counter() - began))
            self.count_kept(conn)
        self.summary.seconds = time.perf_counter() - started
        return self.summary

    def count_kept(self, conn: Connection) -> None:
        """Once nothing eligible is left: how many stay for their Idempotency-Key."""
        now = self.clock()
        cut = cutoff_of(conn, older_than=self.older_than, keep_rows=self.keep_rows, now=now)
        if cut is not None:
            self.summary.key_held = self._count_key_held(conn, cut, now)
        conn.commit()

    @contextmanager
    def session(self) -> Iterator[Connection | None]:
        """A connection for the run; None when another process holds the PostgreSQL lock."""
        with self.engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            if postgres:
                locked = conn.execute(select(func.pg_try_advisory_lock(ADVISORY_KEY))).scalar()
                conn.commit()
                if not locked:
                    yield None
                    return
            try:
                yield conn
            finally:
                if self._appender is not None:
                    self._appender.close()
                    self._appender = None
                if postgres and not conn.invalidated:
                    conn.rollback()
                    conn.execute(select(func.pg_advisory_unlock(ADVISORY_KEY)))
                    conn.commit()

    # -- whole partitions (PostgreSQL) ---------------------------------------------------

    def drop_partitions(self, conn: Connection) -> int:
        """Drop each day partition of the log whose orders are *all* prunable, with those
        orders (archived first); how many. A day holding one order that must stay (running,
        parked, leased, undelivered events, too recent) is left to the batches, which
        delete its prunable orders row by row. PostgreSQL with a partitioned log only."""
        if not partitions.is_partitioned(conn):
            conn.commit()
            return 0
        now = self.clock()
        cut = cutoff_of(conn, older_than=self.older_than, keep_rows=self.keep_rows, now=now)
        # Only a day wholly before the cutoff can be all prunable.
        days = [d for d in partitions.existing(conn) if cut is not None and d.end <= cut]
        counts = self._day_counts(conn, days, cut, now) if days and cut is not None else {}
        conn.commit()
        dropped = 0
        for day in days:
            total, ok = counts.get(day.start.date(), (0, 0))
            if total != ok or cut is None:  # one must stay: the batches take the others
                continue
            try:
                dropped += self._drop_day(conn, day, total, cut, now)
            except DBAPIError as exc:  # a lock not had, a conflict: the batches do it
                conn.rollback()
                log.warning("prune: partition %s left to batches: %s", day.name, exc.orig)
        return dropped

    def _day_counts(
        self, conn: Connection, days: list[partitions.Partition], cut: datetime, now: datetime
    ) -> dict[date, tuple[int, int]]:
        """Per UTC day of creation: (orders, prunable ones), in one scan of `orders` (no
        index on created_at: it would cost every update of an order)."""
        bucket = func.date_trunc("day", func.timezone("UTC", orders.c.created_at))
        rows = conn.execute(
            select(bucket, func.count(), func.count().filter(and_(*eligible(cutoff=cut, now=now))))
            .where(orders.c.created_at >= days[0].start, orders.c.created_at < days[-1].end)
            .group_by(bucket)
        )
        return {when.date(): (int(total), int(ok)) for when, total, ok in rows}

    def _drop_day(
        self, conn: Connection, day: partitions.Partition, total: int, cut: datetime, now: datetime
    ) -> int:
        within = [orders.c.created_at >= day.start, orders.c.created_at < day.end]
        prunable = and_(*eligible(cutoff=cut, now=now))
        archiving = self._appender_factory is not None and total > 0
        versions = self._archive_day(conn, within, now) if archiving else {}
        self.crash("partition-archived")
        try:
            for table in (deliveries, events, attempts):  # all delivered: eligible says so
                conn.execute(
                    table.delete().where(table.c.order_id.in_(select(orders.c.id).where(*within)))
                )
            gone = conn.execute(
                orders.delete().where(*within, prunable).returning(orders.c.id, orders.c.version)
            ).all()
            left = conn.execute(select(orders.c.id).where(*within).limit(1)).first()
            changed = archiving and any(versions.get(i) != v for i, v in gone)
            if left is not None or changed:  # moved or claimed since the count: next time
                conn.rollback()
                return 0
            lines = partitions.rows_in(conn, day.name)
            if not partitions.detach(conn, day.name):
                conn.rollback()
                log.info("prune: %s busy; left for the next pass", day.name)
                return 0
            partitions.drop(conn, day.name)
            self.crash("partition-dropped")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        self.summary.eligible += total
        self.summary.deleted += len(gone)
        self.summary.transitions += lines
        self.summary.partitions += 1
        log.info("prune: dropped %s with its %d orders", day.name, len(gone))
        return 1

    def _archive_day(
        self, conn: Connection, within: list[ColumnElement[bool]], now: datetime
    ) -> dict[uuid.UUID, int]:
        """Archive every order of the day (`batch` x 10 at a time); their versions."""
        ids = list(conn.execute(select(orders.c.id).where(*within).order_by(orders.c.id)).scalars())
        versions: dict[uuid.UUID, int] = {}
        step = max(self.batch * 10, 1000)
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            found, history = self._read(conn, orders.c.id.in_(chunk))
            versions.update((o.id, o.version) for o in found)
            self._archive(found, history, now)
        conn.commit()
        return versions

    # -- one batch -----------------------------------------------------------------------

    def one_batch(self, conn: Connection) -> int:
        """Archive and delete up to `batch` eligible orders; how many were found (0: done)."""
        now = self.clock()
        cut = cutoff_of(conn, older_than=self.older_than, keep_rows=self.keep_rows, now=now)
        conn.commit()
        if cut is None:
            return 0
        found, history = self._candidates(conn, cut, now)
        conn.commit()  # no snapshot or lock held while the archive is written
        if not found:
            return 0
        self.summary.batches += 1
        self.summary.eligible += len(found)
        self._archive(found, history, now)
        self.crash("archived")
        deleted, lines = self._delete(conn, found, cut, now)
        self.summary.deleted += deleted
        self.summary.transitions += lines
        self.summary.changed += len(found) - deleted
        self.crash("batch")
        return len(found)

    def _archive(
        self, found: list[Order], history: dict[uuid.UUID, list[Transition]], now: datetime
    ) -> None:
        """Append them to the archive (fsynced) when archiving; nothing otherwise."""
        if self._appender_factory is None or not found:
            return
        if self._appender is None:
            self._appender = self._appender_factory()
            self.summary.archive = str(self._appender.path)
        self._appender.append(
            archive.encode(o, history.get(o.id, []), archived_at=now) for o in found
        )
        self.summary.archived += len(found)

    def _candidates(
        self, conn: Connection, cut: datetime, now: datetime
    ) -> tuple[list[Order], dict[uuid.UUID, list[Transition]]]:
        return self._read(conn, *eligible(cutoff=cut, now=now), limit=self.batch)

    def _read(
        self, conn: Connection, *where: ColumnElement[bool], limit: int | None = None
    ) -> tuple[list[Order], dict[uuid.UUID, list[Transition]]]:
        """The orders matching `where` (oldest move first) and, when archiving, their
        logs (not read otherwise: nothing needs them)."""
        # Read raw and parsed row by row (fsm.queries): one broken value skips its order
        # instead of failing the whole read, and with it every prune from then on.
        result = conn.execute(
            select(*ORDER_ROW).where(*where).order_by(orders.c.updated_at).limit(limit)
        )
        found = []
        for row in result:
            try:
                found.append(order_of_row(row))
            except CorruptOrder as exc:  # never deleted: it cannot be archived faithfully
                log.error("prune: skipping %s", exc)
        history: dict[uuid.UUID, list[Transition]] = {}
        if found and self._appender_factory is not None:
            lines = conn.execute(
                select(*TRANSITION_ROW)
                .where(*_log_of(found))
                .order_by(transitions.c.order_id, transitions.c.seq)
            )
            broken = set()
            for r in lines:
                try:
                    t = transition_of_row(r)
                except CorruptOrder as exc:  # its log cannot be archived faithfully: kept
                    log.error("prune: skipping %s", exc)
                    broken.add(r.order_id)
                    continue
                history.setdefault(t.order_id, []).append(t)
            found = [o for o in found if o.id not in broken]
        return found, history

    def _delete(
        self, conn: Connection, found: list[Order], cut: datetime, now: datetime
    ) -> tuple[int, int]:
        """One transaction: lock what is still eligible and unchanged, delete its
        transitions, then it. Returns (orders, transitions) deleted."""
        postgres = conn.dialect.name == "postgresql"
        if not postgres:
            conn.exec_driver_sql(sql.SQLITE_BEGIN)  # the write lock before the check
        try:
            same = tuple_(orders.c.id, orders.c.version).in_([(o.id, o.version) for o in found])
            check = select(orders.c.id).where(same, *eligible(cutoff=cut, now=now))
            if postgres:
                check = check.with_for_update(skip_locked=True)
            ids = [i for (i,) in conn.execute(check)]
            if not ids:
                conn.rollback()
                return 0, 0
            kept = set(ids)
            lines = conn.execute(
                transitions.delete().where(*_log_of([o for o in found if o.id in kept]))
            )
            # Their events, every one delivered (eligible says so): the outbox keeps no orphans.
            conn.execute(deliveries.delete().where(deliveries.c.order_id.in_(ids)))
            conn.execute(events.delete().where(events.c.order_id.in_(ids)))
            # its failed attempts (why it once stood still) go with it: not archived
            conn.execute(attempts.delete().where(attempts.c.order_id.in_(ids)))
            self.crash("transitions")
            gone = conn.execute(orders.delete().where(orders.c.id.in_(ids)))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return int(gone.rowcount), int(lines.rowcount)


def _log_of(found: list[Order]) -> list[ColumnElement[bool]]:
    """The transition rows of these orders; with their creation times PostgreSQL reads
    only the partitions holding them (fsm.partitions)."""
    return [
        transitions.c.order_id.in_([o.id for o in found]),
        transitions.c.order_created_at.in_(sorted({o.created_at for o in found})),
    ]


def _now() -> datetime:
    from fsm.store import utcnow

    return utcnow()


def archive_file(directory: str | Path) -> archive.Appender:
    """A new archive file in `directory` for one background pass."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    return archive.Appender(folder / f"orders-{stamp}-{os.getpid()}.jsonl.gz")


def enabled(settings: Settings) -> bool:
    return settings.retention_seconds is not None or settings.retention_rows is not None


def pruner_for(settings: Settings, engine: Engine) -> Pruner:
    directory = settings.archive_dir
    return Pruner(
        engine,
        older_than=settings.retention_seconds,
        keep_rows=settings.retention_rows,
        batch=settings.retention_batch,
        appender=(lambda: archive_file(directory)) if directory else None,
        crash=crash_hook(settings.crash_after),
    )


async def prune_forever(*, engine: Engine, settings: Settings) -> None:
    """The background pass of `serve`/`worker`: every `retention_interval` seconds, batch
    by batch (each in a worker thread, paced to at most half the time), until cancelled."""
    while True:
        pruner = pruner_for(settings, engine)
        try:
            await _run_paced(pruner)
            if pruner.summary.deleted or pruner.summary.changed:
                log.info("retention: %s", pruner.summary.line())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not outage(exc):
                log.exception(
                    "retention pass failed; trying again in %ss", settings.retention_interval
                )
            else:  # every interval for as long as it lasts: one line each
                log.warning(
                    "retention pass failed: %s; trying again in %ss",
                    outage_line(exc),
                    settings.retention_interval,
                )
                log.debug("retention pass failed", exc_info=exc)
        await asyncio.sleep(settings.retention_interval)


async def _run_paced(pruner: Pruner) -> None:
    """`Pruner.run` with each step in a worker thread (the session's connect and lock
    too: the event loop never waits on the database) and the pauses awaited."""
    started = time.perf_counter()
    session = pruner.session()
    conn = await _step(session.__enter__)
    try:
        if conn is None:
            return
        await _step(pruner.drop_partitions, conn)
        while True:
            began = time.perf_counter()
            if not await _step(pruner.one_batch, conn):
                break
            await asyncio.sleep(time.perf_counter() - began)  # the writer's turn
        await _step(pruner.count_kept, conn)
    finally:
        await _step(session.__exit__, None, None, None)
    pruner.summary.seconds = time.perf_counter() - started


async def _step(fn: Callable[..., T], *args: Any) -> T:
    """`fn` in a worker thread; cancelled meanwhile, it is let finish before the
    cancellation goes on (the session is closed after it, never under it)."""
    step = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        await asyncio.wait({step})
        raise
