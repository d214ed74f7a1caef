"""The outbox's SQL: the statement that writes an event in the transition's own commit (the
event row only), and the relay's and the operator's statements (a destination's cursor over
the event stream, its exception rows: retry, dead letter, redeliver, list). Statement texts
and cursor ops only; no decisions (fsm.relay decides retry or dead letter), no sending.

Work is found by a cursor per destination over a position given in commit order:
- SQLite: `position` is the table's INTEGER PRIMARY KEY AUTOINCREMENT. A writer holds the
  database's only write lock from its first write to its commit, so positions are taken in
  commit order; AUTOINCREMENT never reuses one (retention deletes the newest rows too).
- PostgreSQL: a sequence's order is not commit order (the auto-increment trap: a
  transaction that took position 11 may commit before one that took 10). Each event also
  carries its transaction's id (`txid`); the relay reads only events of transactions below
  the horizon `pg_snapshot_xmin(pg_current_snapshot())` (every one of them has ended: no
  later commit adds a row below it) and follows (txid, position), never the position alone.
A delivery that failed once, and the order's later events held behind it, get a row in
`outbox_deliveries` (the exceptions, retried by state as before); an order's event is sent
only when every earlier event of that order to that destination is delivered: in order per
order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from fsm.bounds import MAX_COUNT
from fsm.sql import Dialect, guarded_move_then, parse_utc

EVENT_COLUMNS = ("id", "order_id", "seq", "type", "created_at", "body")
_EVENT_MARKS = ", ".join(["%s"] * len(EVENT_COLUMNS))
# A new destination's cursor on PostgreSQL: after every transaction below the horizon, so
# the events of those still running (they may commit after the destination) are delivered.
MAX_POSITION = MAX_COUNT  # a bigint's largest
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


@dataclass(frozen=True)
class EventRow:
    """An event as the store writes it (values already encoded for the driver)."""

    params: tuple[Any, ...]  # EVENT_COLUMNS


# -- the hot path: the event in the transition's commit -----------------------------------


@lru_cache(maxsize=8)
def insert_event(d: Dialect) -> str:
    return d.sql(f"INSERT INTO outbox_events ({', '.join(EVENT_COLUMNS)}) VALUES ({_EVENT_MARKS})")


@lru_cache(maxsize=128)
def move_with_event(columns: tuple[str, ...]) -> str:
    """PostgreSQL: the guarded UPDATE, its transition row and the event in one statement;
    its row count is 1 when all happened, 0 when none did."""
    return guarded_move_then(
        columns,
        f"INSERT INTO outbox_events ({', '.join(EVENT_COLUMNS)}) SELECT {_EVENT_MARKS} FROM logged",
    )


@lru_cache(maxsize=8)
def create_with_event(columns: tuple[str, ...]) -> str:
    """PostgreSQL: insert the order (unless its id or key exists) with its `order.created`
    event, in one statement; row count 1 when inserted."""
    marks = ", ".join(["%s"] * len(columns))
    return (
        f"WITH ins AS (INSERT INTO orders ({', '.join(columns)}) VALUES ({marks}) "
        "ON CONFLICT DO NOTHING RETURNING id) "
        f"INSERT INTO outbox_events ({', '.join(EVENT_COLUMNS)}) SELECT {_EVENT_MARKS} FROM ins"
    )


def write_event(d: Dialect, cursor: Any, event: EventRow) -> None:
    """SQLite (in-process: no round trips to save): the event row."""
    cursor.execute(insert_event(d), event.params)


# -- the relay ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    event_id: str
    order_id: uuid.UUID
    seq: int
    attempts: int
    created_at: datetime
    retry_from: datetime
    type: str
    body: str
    txid: int = 0  # the stream's events: where they stand in it (exception rows: unused)
    position: int = 0


# An order's delivery is due only when it is the order's first undelivered one to its
# destination (in order per order). Asked per candidate as "its seq is the least undelivered
# seq of its order" (one probe of ix_outbox_deliveries_order), not as NOT EXISTS (an earlier
# undelivered one): PostgreSQL turns a NOT EXISTS into an anti join, and before the table
# has statistics (a fresh database, the first minute of autovacuum) it planned that join as
# a nested loop over every undelivered row of the destination per candidate: 0.4-1.8 s per
# claim at a backlog of 2,000 events, a core of the relay's backend. A correlated scalar
# subquery stays a per-row index probe whatever the statistics say.
_FIRST_UNDELIVERED = (
    "d.seq = (SELECT MIN(p.seq) FROM outbox_deliveries p WHERE p.destination_id = "
    "d.destination_id AND p.order_id = d.order_id AND p.state <> 'delivered')"
)


_ANY_DEAD = "SELECT 1 FROM outbox_deliveries WHERE destination_id = %s AND state = 'dead' LIMIT 1"


@lru_cache(maxsize=8)
def due(d: Dialect) -> str:
    """The due deliveries of a destination: each pending, past its next attempt, not leased,
    and the first undelivered one of its order; oldest first, at most `limit` (PostgreSQL:
    locked, skipping rows another relay has locked, so relays take disjoint sets)."""
    return d.sql(
        "SELECT d.event_id FROM outbox_deliveries d WHERE d.destination_id = %s "
        "AND d.state = 'pending' AND d.next_attempt_at <= %s "
        f"AND (d.lease_until IS NULL OR d.lease_until < %s) AND {_FIRST_UNDELIVERED} "
        f"ORDER BY d.created_at, d.seq LIMIT %s {d.skip_locked}"
    )


_ANY_UNFINISHED = (
    "SELECT 1 FROM outbox_deliveries WHERE destination_id = %s AND state IN ('pending', 'dead') "
    "LIMIT 1"
)


@dataclass(frozen=True)
class Work:
    """What a destination's pump has to do, as a read sees it (no write lock taken)."""

    stream: bool  # events after its cursor, and the cursor's lease free or this relay's
    due: list[str]  # exception rows due (`due`)
    dead: bool  # a dead letter (then `claim` must run: it sweeps the events behind one)
    # PostgreSQL: events after its cursor, none below the horizon (an open transaction,
    # in any database of the server, holds them back)
    behind_horizon: bool = False


def work(
    d: Dialect, cursor: Any, *, destination_id: int, owner: str, now: datetime, limit: int
) -> Work:
    """The pump's look before it writes: on SQLite the search of the backlog then holds no
    write lock the engine's commits would wait for; an idle relay writes nothing."""
    stamp = d.timestamp(now)
    stream = behind = False
    cursor.execute(
        d.sql(
            "SELECT txid, position, lease_owner, lease_until FROM outbox_cursors "
            "WHERE destination_id = %s"
        ),
        [destination_id],
    )
    row = cursor.fetchone()
    if row is not None and (row[2] in (None, owner) or _time(row[3]) < now):
        cursor.execute(any_after(d), _cursor_params(d, (row[0], row[1])))
        first = cursor.fetchone()
        stream, behind = first is not None and bool(first[0]), first is not None and not first[0]
    found = _due_ids(d, cursor, destination_id=destination_id, stamp=stamp, limit=limit)
    cursor.execute(d.sql(_ANY_DEAD), [destination_id])
    return Work(stream, found, cursor.fetchone() is not None, behind)


def _due_ids(d: Dialect, cursor: Any, *, destination_id: int, stamp: Any, limit: int) -> list[str]:
    cursor.execute(due(d), [destination_id, stamp, stamp, limit])
    return [r[0] for r in cursor.fetchall()]


def claim(
    d: Dialect,
    cursor: Any,
    *,
    destination_id: int,
    owner: str,
    now: datetime,
    lease_until: datetime,
    limit: int,
    found: list[str] | None = None,
) -> list[Claimed]:
    """Lease up to `limit` due deliveries, each the oldest undelivered event of its order
    (PostgreSQL: SKIP LOCKED, so relays take disjoint sets). `found`: the due ones as
    `work` saw them before this transaction (SQLite: the search holds no write lock);
    those still due are leased."""
    _sweep_behind_dead(d, cursor, destination_id=destination_id)
    stamp = d.timestamp(now)
    # The due ones found first (unless the caller found them: `found`), then leased by
    # primary key, their ids written out: as one statement (`IN (SELECT ...)` of the
    # LIMITed, SKIP LOCKED select) PostgreSQL planned the lookup as a scan of all the
    # destination's rows, delivered ones included, before the table had statistics.
    if found is None:
        found = _due_ids(d, cursor, destination_id=destination_id, stamp=stamp, limit=limit)
    rows = _lease(
        d,
        cursor,
        destination_id=destination_id,
        owner=owner,
        event_ids=found,
        stamp=stamp,
        lease_until=lease_until,
    )
    return sorted(_with_bodies(d, cursor, rows), key=lambda c: (c.created_at, c.seq))


def _sweep_behind_dead(d: Dialect, cursor: Any, *, destination_id: int) -> None:
    """An event committed after an earlier one of its order was dead-lettered joins it (it
    would not be claimed anyway: the earlier one is not delivered). Swept only while the
    destination has a dead letter at all: an index probe, not a scan per claim."""
    cursor.execute(d.sql(_ANY_DEAD), [destination_id])
    if cursor.fetchone() is None:
        return
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries SET state = 'dead', last_error = 'behind a dead letter' "
            "WHERE destination_id = %s AND state = 'pending' AND EXISTS (SELECT 1 FROM "
            "outbox_deliveries p WHERE p.destination_id = outbox_deliveries.destination_id "
            "AND p.order_id = outbox_deliveries.order_id AND p.seq < outbox_deliveries.seq "
            "AND p.state = 'dead')"
        ),
        [destination_id],
    )


def _lease(
    d: Dialect,
    cursor: Any,
    *,
    destination_id: int,
    owner: str,
    event_ids: list[str],
    stamp: Any,
    lease_until: datetime,
) -> list[Any]:
    """Lease those of `event_ids` still due at `stamp` (`claim`); their rows: event_id,
    order_id, seq, attempts, created_at, retry_from (as the driver hands them back)."""
    if not event_ids:
        return []
    # Each still due (found outside this transaction, one may have been leased, sent or
    # dead-lettered since): the same conditions as `due`, asked again of the listed rows.
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries AS d SET lease_owner = %s, lease_until = %s, "
            "attempts = attempts + 1 WHERE d.destination_id = %s "
            f"AND d.event_id IN ({', '.join(['%s'] * len(event_ids))}) "
            "AND d.state = 'pending' AND d.next_attempt_at <= %s "
            f"AND (d.lease_until IS NULL OR d.lease_until < %s) AND {_FIRST_UNDELIVERED} "
            "RETURNING event_id, order_id, seq, attempts, created_at, retry_from"
        ),
        [owner, d.timestamp(lease_until), destination_id, *event_ids, stamp, stamp],
    )
    leased: list[Any] = cursor.fetchall()
    return leased


def _with_bodies(d: Dialect, cursor: Any, rows: list[Any]) -> list[Claimed]:
    """The leased rows of `_lease` with their events' types and bodies, in their order."""
    if not rows:
        return []
    cursor.execute(
        d.sql(
            "SELECT id, type, body FROM outbox_events "
            f"WHERE id IN ({', '.join(['%s'] * len(rows))})"
        ),
        [r[0] for r in rows],
    )
    bodies = {r[0]: (r[1], r[2]) for r in cursor.fetchall()}
    return [
        _claimed(r[0], r[1], r[2], *bodies[r[0]], r[4], attempts=r[3], retry_from=r[5])
        for r in rows
    ]


def _claimed(
    event_id: str,
    order_id: Any,
    seq: int,
    type: str,
    body: str,
    created_at: Any,
    *,
    attempts: int = 0,
    retry_from: Any = None,
    txid: Any = 0,
    position: Any = 0,
) -> Claimed:
    """An event's values as the driver hands them back, as a `Claimed`: an exception row's
    (`claim`: its attempts and since when it is retried) or the stream's (`take_batch`: no
    attempt yet, retried from its creation, and where it stands in the stream)."""
    created = _time(created_at)
    return Claimed(
        event_id=event_id,
        order_id=_uuid(order_id),
        seq=seq,
        attempts=attempts,
        created_at=created,
        retry_from=created if retry_from is None else _time(retry_from),
        type=type,
        body=body,
        txid=int(txid),
        position=int(position),
    )


def delivered(
    d: Dialect, cursor: Any, *, destination_id: int, event_ids: list[str], now: datetime
) -> None:
    """A batch's delivered events, in one statement (one round trip for the batch)."""
    if not event_ids:
        return
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries SET state = 'delivered', delivered_at = %s, "
            "lease_owner = NULL, lease_until = NULL, last_error = NULL "
            f"WHERE destination_id = %s AND event_id IN ({', '.join(['%s'] * len(event_ids))})"
        ),
        [d.timestamp(now), destination_id, *event_ids],
    )


def retry_later(
    d: Dialect,
    cursor: Any,
    *,
    destination_id: int,
    event_id: str,
    owner: str,
    at: datetime,
    error: str,
) -> None:
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries SET next_attempt_at = %s, last_error = %s, "
            "lease_owner = NULL, lease_until = NULL "
            "WHERE destination_id = %s AND event_id = %s AND lease_owner = %s "
            "AND state = 'pending'"
        ),
        [d.timestamp(at), error[:500], destination_id, event_id, owner],
    )


# A destination's pending deliveries waiting out a backoff (ix_outbox_deliveries_due).
_WAITING = "destination_id = %s AND state = 'pending' AND next_attempt_at > %s"


def waiting(d: Dialect, cursor: Any, *, destination_id: int, now: datetime) -> bool:
    """Whether a pending delivery of the destination waits out a backoff (one probe)."""
    cursor.execute(
        d.sql(f"SELECT 1 FROM outbox_deliveries WHERE {_WAITING} LIMIT 1"),
        [destination_id, d.timestamp(now)],
    )
    return cursor.fetchone() is not None


def hurry(d: Dialect, cursor: Any, *, destination_id: int, now: datetime) -> int:
    """Every pending delivery of the destination waiting out a backoff made due `now`, in
    one statement (the relay: it delivers again after failing, or a pump of it starts).
    Per-order order holds: `claim` still leases only an order's first undelivered event,
    and the stream holds an order that has one. Returns how many."""
    stamp = d.timestamp(now)
    cursor.execute(
        d.sql(f"UPDATE outbox_deliveries SET next_attempt_at = %s WHERE {_WAITING}"),
        [stamp, destination_id, stamp],
    )
    return int(cursor.rowcount)


def dead_letter(
    d: Dialect, cursor: Any, *, destination_id: int, claimed: Claimed, owner: str, error: str
) -> bool:
    """The event, and the order's later events to this destination (they must not overtake
    it), are set aside until an operator redelivers them; only while `owner` still holds
    the claim and the row is pending, as `retry_later` (a relay whose lease ran out
    mid-send must not dead-letter a row another relay has since delivered). False: not
    this relay's any more, nothing changed."""
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries SET state = 'dead', last_error = %s, "
            "lease_owner = NULL, lease_until = NULL "
            "WHERE destination_id = %s AND event_id = %s AND lease_owner = %s "
            "AND state = 'pending'"
        ),
        [error[:500], destination_id, claimed.event_id, owner],
    )
    if cursor.rowcount != 1:
        return False
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries SET state = 'dead', last_error = %s "
            "WHERE destination_id = %s AND order_id = %s AND seq > %s AND state = 'pending'"
        ),
        ["behind a dead letter", destination_id, d.uuid(claimed.order_id), claimed.seq],
    )
    return True


_REVIVE = (
    "UPDATE outbox_deliveries SET state = 'pending', next_attempt_at = %s, retry_from = %s, "
    "last_error = NULL, lease_owner = NULL, lease_until = NULL WHERE state = 'dead'"
)


def redeliver(
    d: Dialect, cursor: Any, *, event_id: str | None, now: datetime
) -> tuple[int, int | None]:
    """Dead letters back to pending: one event's order's dead events on the destinations
    where that event is dead (its earlier ones too, so order holds), or all. Returns how
    many, and for one event the lowest seq revived (None: it was not dead)."""
    stamp = d.timestamp(now)
    if event_id is None:
        cursor.execute(d.sql(_REVIVE), [stamp, stamp])
        return int(cursor.rowcount), None
    order_id, _seq = split_id(event_id)
    # From the order's earliest dead event, not from this one: an earlier dead letter
    # would hold it back, and the claim's sweep would set it dead again ("behind a dead
    # letter") after the operator was told it is back in line.
    mine = (
        "order_id = %s AND destination_id IN (SELECT destination_id FROM outbox_deliveries "
        "WHERE event_id = %s AND state = 'dead')"
    )
    params = [d.uuid(order_id), event_id]
    cursor.execute(
        d.sql(f"SELECT MIN(seq) FROM outbox_deliveries WHERE state = 'dead' AND {mine}"), params
    )
    (lowest,) = cursor.fetchone()
    if lowest is None:
        return 0, None
    cursor.execute(d.sql(f"{_REVIVE} AND {mine}"), [stamp, stamp, *params])
    return int(cursor.rowcount), int(lowest)


def split_id(event_id: str) -> tuple[uuid.UUID, int]:
    """`<order_id>:<seq>` -> its parts; ValueError when it is not an event id."""
    order, _, seq = event_id.rpartition(":")
    try:
        return uuid.UUID(order), int(seq)
    except ValueError:
        raise ValueError(f"{event_id!r} is not an event id (<order_id>:<seq>)") from None


# -- the stream: a destination's cursor ---------------------------------------------------


def _past(d: Dialect, e: str = "e", c: str | None = None) -> str:
    """`e` is after the cursor (`c`'s columns, or the cursor's parameters: two on
    PostgreSQL, one on SQLite), below the horizon or not (undelivered either way)."""
    if d.name == "sqlite":
        return f"{e}.position > {c + '.position' if c else '%s'}"
    bound = f"({c}.txid, {c}.position)" if c else "(%s, %s)"
    return f"({e}.txid, {e}.position) > {bound}"


def _after(d: Dialect, e: str = "e") -> str:
    """`e` is after the cursor (its parameters) and readable: below the horizon on
    PostgreSQL."""
    past = _past(d, e)
    return past if d.name == "sqlite" else f"{past} AND {e}.txid < {_HORIZON}"


def _cursor_params(d: Dialect, at: tuple[int, int]) -> list[int]:
    return [at[1]] if d.name == "sqlite" else [at[0], at[1]]


@lru_cache(maxsize=8)
def any_after(d: Dialect) -> str:
    """The first event after the cursor (two parameters on PostgreSQL, one on SQLite), as
    one column: is it readable? On PostgreSQL it is the lowest txid after the cursor: when
    that one is not below the horizon, none is (events wait behind an open transaction).
    Ordered as `_next_events` is: without ORDER BY, PostgreSQL may plan the LIMIT 1 as a
    sequential scan (no statistics on a fresh table); ordered, it stays a range scan of
    ix_outbox_events_txid_position stopping at the first."""
    if d.name == "sqlite":
        return d.sql(f"SELECT 1 FROM outbox_events e WHERE {_after(d)} ORDER BY e.position LIMIT 1")
    return d.sql(
        f"SELECT e.txid < {_HORIZON} FROM outbox_events e "
        "WHERE (e.txid, e.position) > (%s, %s) ORDER BY e.txid, e.position LIMIT 1"
    )


# The transaction that holds the horizon back (fsm.relay names it when events wait behind
# it): the session whose transaction id is the snapshot's xmin (a 64-bit xid8; the
# session's `backend_xid` is its 32-bit wraparound form), else one whose snapshot is at it.
# Never the `query` column: a statement's text may hold secrets.
_HOLDER = (
    "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xid8) "
    "SELECT h.xid8, a.pid, a.datname, a.usename, a.application_name, a.state, "
    "EXTRACT(EPOCH FROM now() - a.xact_start), a.backend_xid::text::bigint = h.xid8 %% 4294967296 "
    "FROM h LEFT JOIN pg_stat_activity a ON a.pid <> pg_backend_pid() "
    "AND (a.backend_xid::text::bigint = h.xid8 %% 4294967296 "
    "OR a.backend_xmin::text::bigint = h.xid8 %% 4294967296) "
    "ORDER BY a.backend_xid::text::bigint = h.xid8 %% 4294967296 DESC NULLS LAST, "
    "a.xact_start NULLS LAST LIMIT 1"
)


@dataclass(frozen=True)
class Holder:
    """The horizon (`xid`), and the session holding it back, if one is visible (`pid`
    None: another role's session, hidden from this one, or a prepared transaction)."""

    xid: int
    pid: int | None = None
    database: str | None = None
    user: str | None = None
    application: str | None = None
    state: str | None = None
    open_seconds: float | None = None
    by_xid: bool = False  # its own transaction id (else: only its snapshot is at it)


def horizon_holder(d: Dialect, cursor: Any) -> Holder:
    """PostgreSQL: who holds the horizon back (one read of pg_stat_activity)."""
    cursor.execute(d.sql(_HOLDER), [])
    row = cursor.fetchone()
    seconds = None if row[6] is None else float(row[6])
    return Holder(int(row[0]), row[1], row[2], row[3], row[4], row[5], seconds, bool(row[7]))


@lru_cache(maxsize=8)
def _next_events(d: Dialect) -> str:
    order = "e.position" if d.name == "sqlite" else "e.txid, e.position"
    return d.sql(
        "SELECT e.id, e.order_id, e.seq, e.type, e.created_at, e.body, e.txid, e.position "
        f"FROM outbox_events e WHERE {_after(d)} ORDER BY {order} LIMIT %s"
    )


def lease_stream(
    d: Dialect,
    cursor: Any,
    *,
    destination_id: int,
    owner: str,
    now: datetime,
    lease_until: datetime,
) -> tuple[int, int] | None:
    """Take (or renew) the lease of the destination's cursor: its (txid, position), or None
    when another relay holds it (on PostgreSQL the row lock makes the second wait, then
    see the first's lease)."""
    cursor.execute(
        d.sql(
            "UPDATE outbox_cursors SET lease_owner = %s, lease_until = %s "
            "WHERE destination_id = %s AND (lease_owner = %s OR lease_owner IS NULL "
            "OR lease_until < %s) RETURNING txid, position"
        ),
        [owner, d.timestamp(lease_until), destination_id, owner, d.timestamp(now)],
    )
    row = cursor.fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def advance(
    d: Dialect,
    cursor: Any,
    *,
    destination_id: int,
    owner: str,
    batch: Batch,
    lease_until: datetime | None,
) -> bool:
    """Move the cursor past a settled batch (renewing its lease to `lease_until`; None:
    released), if `owner` still holds the lease and the cursor is still where the batch
    was taken from. False: nothing of the batch may be recorded, and it is sent again.
    Either another relay took the cursor, or the cursor is elsewhere with this relay's
    name on it: a commit of this relay's was lost with the database server (the relay's
    commits do not wait for the disk: fsm.wiring.relay_store), and the cursor is back
    before a batch whose failed events' rows went with that commit; moving it past this
    batch would skip them for good."""
    cursor.execute(
        d.sql(
            "UPDATE outbox_cursors SET txid = %s, position = %s, lease_until = %s, "
            "lease_owner = %s WHERE destination_id = %s AND lease_owner = %s "
            "AND txid = %s AND position = %s"
        ),
        [
            *batch.last,
            None if lease_until is None else d.timestamp(lease_until),
            None if lease_until is None else owner,
            destination_id,
            owner,
            *batch.start,
        ],
    )
    return bool(cursor.rowcount == 1)


def release_stream(d: Dialect, cursor: Any, *, destination_id: int, owner: str) -> None:
    cursor.execute(
        d.sql(
            "UPDATE outbox_cursors SET lease_owner = NULL, lease_until = NULL "
            "WHERE destination_id = %s AND lease_owner = %s"
        ),
        [destination_id, owner],
    )


@dataclass(frozen=True)
class Batch:
    """The events after a cursor (every type: the cursor passes those not subscribed to
    as well), in stream order, and which of their orders are held: an unfinished exception
    row of the order to this destination ("dead" when one of them is dead)."""

    events: list[Claimed]
    held: dict[uuid.UUID, str]
    start: tuple[int, int]  # the cursor it was taken after: (txid, position)

    @property
    def last(self) -> tuple[int, int]:
        return self.events[-1].txid, self.events[-1].position


def take_batch(
    d: Dialect,
    cursor: Any,
    *,
    destination_id: int,
    owner: str,
    now: datetime,
    lease_until: datetime,
    limit: int,
    at: tuple[int, int] | None = None,
) -> Batch | None:
    """Lease the destination's cursor and read up to `limit` events after it; None when
    another relay holds the cursor, an empty batch when there is nothing after it. `at`:
    where the cursor is, its lease just renewed (`advance`): read from there."""
    if at is None:
        at = lease_stream(
            d, cursor, destination_id=destination_id, owner=owner, now=now, lease_until=lease_until
        )
    if at is None:
        return None
    cursor.execute(_next_events(d), [*_cursor_params(d, at), limit])
    events = [
        _claimed(r[0], r[1], r[2], r[3], r[5], r[4], txid=r[6], position=r[7])
        for r in cursor.fetchall()
    ]
    held = held_orders(d, cursor, destination_id=destination_id, events=events)
    return Batch(events, held, at)


def held_orders(
    d: Dialect, cursor: Any, *, destination_id: int, events: list[Claimed]
) -> dict[uuid.UUID, str]:
    """The orders of `events` with an unfinished exception row to this destination -> "dead"
    if one of those is dead, else "pending". Asked only when the destination has any."""
    if not events:
        return {}
    cursor.execute(d.sql(_ANY_UNFINISHED), [destination_id])
    if cursor.fetchone() is None:
        return {}
    orders = list({e.order_id: None for e in events})
    cursor.execute(
        d.sql(
            "SELECT order_id, MAX(CASE WHEN state = 'dead' THEN 1 ELSE 0 END) "
            "FROM outbox_deliveries WHERE destination_id = %s AND state <> 'delivered' "
            f"AND order_id IN ({', '.join(['%s'] * len(orders))}) GROUP BY order_id"
        ),
        [destination_id, *(d.uuid(o) for o in orders)],
    )
    return {_uuid(r[0]): "dead" if r[1] else "pending" for r in cursor.fetchall()}


@dataclass(frozen=True)
class Aside:
    """An event of the stream that was not delivered: an exception row to write."""

    event: Claimed
    state: str  # pending (retried at `next_attempt_at`) | dead
    attempts: int
    next_attempt_at: datetime
    error: str | None


# Rows per INSERT of `set_aside`: 10 parameters each, 5,000 a statement, well under
# SQLite's 32,766 and PostgreSQL's 65,535 bound parameters whatever `relay_batch` is
# (up to 10,000 events: 100,000 parameters in one statement failed every settle). The
# other lists built from a batch bind one parameter per event (`relay_batch` + a few).
ASIDE_CHUNK = 500


def set_aside(d: Dialect, cursor: Any, *, destination_id: int, rows: list[Aside]) -> None:
    """The exception rows of a settled batch, `ASIDE_CHUNK` rows a statement."""
    for start in range(0, len(rows), ASIDE_CHUNK):
        _insert_aside(d, cursor, destination_id, rows[start : start + ASIDE_CHUNK])


def _insert_aside(d: Dialect, cursor: Any, destination_id: int, rows: list[Aside]) -> None:
    marks = "(" + ", ".join(["%s"] * 10) + ")"
    params: list[Any] = []
    for row in rows:
        e = row.event
        stamp = d.timestamp(e.created_at)
        params += [
            destination_id, e.event_id, d.uuid(e.order_id), e.seq, row.state, row.attempts,
            d.timestamp(row.next_attempt_at), None if row.error is None else row.error[:500],
            stamp, stamp,
        ]  # fmt: skip
    cursor.execute(
        d.sql(
            "INSERT INTO outbox_deliveries (destination_id, event_id, order_id, seq, state, "
            "attempts, next_attempt_at, last_error, created_at, retry_from) "
            f"VALUES {', '.join([marks] * len(rows))} ON CONFLICT DO NOTHING"
        ),
        params,
    )


# -- destinations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    id: int
    name: str
    kind: str
    url: str
    secret: str | None  # a webhook's current signing secret
    events: str
    # The secret a rotation replaced, signing beside `secret` until `previous_until`.
    previous_secret: str | None = None
    previous_until: datetime | None = None
    previous_for: str | None = None  # the fingerprint of the `secret` they go with

    @property
    def label(self) -> str:
        """What the public outputs call it (/metrics labels, /healthz `events_lagging` and
        `events_dead`, the relay's log lines): a webhook's name is its URL, whose path or
        query may carry a token (Slack, Discord), so `webhook:<id> <scheme>://<host>[:<port>]`;
        the full URL only where webhooks are managed (`webhooks list`, an admin's console
        events page)."""
        if self.kind != "webhook":
            return self.name
        return f"webhook:{self.id} {origin(self.url)}"


def origin(url: str) -> str:
    """`scheme://host[:port]` of a URL: no user, password, path, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: leave it out
        port = None
    return f"{parts.scheme}://{host}" + ("" if port is None else f":{port}")


# A Destination's columns, in its fields' order (`_destination` reads a row of them).
_COLUMNS = (
    "id", "name", "kind", "url", "secret", "events",
    "previous_secret", "previous_until", "previous_for",
)  # fmt: skip
_DESTINATION = f"SELECT {', '.join(_COLUMNS)} FROM event_destinations"


def _destination(row: Any) -> Destination:
    destination_id, name, kind, url, secret, events, previous, until, of = row
    return Destination(
        destination_id, name, kind, url, secret, events, previous, parse_utc(until), of
    )


def destinations(d: Dialect, cursor: Any) -> list[Destination]:
    cursor.execute(d.sql(f"{_DESTINATION} ORDER BY id"))
    return [_destination(row) for row in cursor.fetchall()]


def add_destination(
    d: Dialect,
    cursor: Any,
    *,
    name: str,
    kind: str,
    url: str,
    secret: str | None,
    events: str,
    now: datetime,
    replace: bool = False,
) -> Destination | None:
    """Insert a destination; None if the name exists (with `replace`: its url and events
    are updated, the secret kept)."""
    conflict = "DO UPDATE SET url = EXCLUDED.url, events = EXCLUDED.events" if replace else ""
    cursor.execute(
        d.sql(
            "INSERT INTO event_destinations (name, kind, url, secret, events, created_at) "
            f"VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) {conflict or 'DO NOTHING'}"
        ),
        [name, kind, url, secret, events, d.timestamp(now)],
    )
    if cursor.rowcount != 1:
        return None
    cursor.execute(d.sql(f"{_DESTINATION} WHERE name = %s"), [name])
    destination = _destination(cursor.fetchone())
    # Its cursor, at the end of the stream (kept when `replace` updated the destination).
    cursor.execute(
        d.sql(
            "INSERT INTO outbox_cursors (destination_id, txid, position) "
            f"SELECT %s, {_START_OF[d.name]} ON CONFLICT DO NOTHING"
        ),
        [destination.id],
    )
    return destination


# SQLite: after the last event (positions are in commit order). PostgreSQL: after every
# transaction below the horizon; the events of the ones still running are delivered.
_START_OF = {
    "sqlite": "0, COALESCE((SELECT MAX(position) FROM outbox_events), 0)",
    "postgresql": f"{_HORIZON} - 1, {MAX_POSITION}",
}


def remove_destination(d: Dialect, cursor: Any, *, destination_id: int) -> bool:
    """The destination, its cursor and its exception rows. The cursor first: on PostgreSQL
    its row lock orders this against a relay's settle (`advance` updates the cursor, then
    `set_aside` inserts the batch's rows, one transaction). A settle already past its
    `advance` is waited for, its rows then deleted here; one after this finds no cursor,
    `advance` answers False and it writes no rows. The other order (rows first) let a
    settle insert rows between the two deletes: exception rows of a destination that is
    gone, which retention counts as undelivered for good."""
    for table in ("outbox_cursors", "outbox_deliveries"):
        cursor.execute(d.sql(f"DELETE FROM {table} WHERE destination_id = %s"), [destination_id])
    cursor.execute(d.sql("DELETE FROM event_destinations WHERE id = %s"), [destination_id])
    return bool(cursor.rowcount == 1)


def webhook_secret(d: Dialect, cursor: Any, *, destination_id: int) -> str | None:
    """A webhook's `secret` column as stored (None: no such webhook); on PostgreSQL its row
    locked until the transaction ends (two rotations at once: one after the other)."""
    lock = " FOR UPDATE" if d.name == "postgresql" else ""
    cursor.execute(
        d.sql(f"SELECT secret FROM event_destinations WHERE id = %s AND kind = 'webhook'{lock}"),
        [destination_id],
    )
    row = cursor.fetchone()
    return None if row is None else str(row[0])


def set_secret(
    d: Dialect,
    cursor: Any,
    *,
    destination_id: int,
    secret: str,
    previous: str | None = None,
    until: datetime | None = None,
    previous_for: str | None = None,
) -> bool:
    """Replace a webhook's secret, and the one signing beside it until `until` (None: none)
    with the fingerprint of the secret it goes with; its id, cursor and exception rows stay
    (a relay sees the changed destination at its next refresh and signs with it from then
    on)."""
    cursor.execute(
        d.sql(
            "UPDATE event_destinations SET secret = %s, previous_secret = %s, "
            "previous_until = %s, previous_for = %s WHERE id = %s AND kind = 'webhook'"
        ),
        [
            secret,
            previous,
            None if until is None else d.timestamp(until),
            previous_for,
            destination_id,
        ],
    )
    return bool(cursor.rowcount == 1)


# -- reads for the operator (metrics, /healthz, the console, `events list`) ---------------


@dataclass(frozen=True)
class Backlog:
    destination: Destination
    pending: int  # not yet delivered and not dead (in flight included)
    dead: int
    oldest_pending: datetime | None  # the lag is its age


# ('%%': psycopg's escape of a literal %, so every statement using it passes parameters;
# to SQLite's LIKE, %% matches what % does.)
_SUBSCRIBED = "ds.events LIKE '%%,' || e.type || ',%%'"


def backlog(d: Dialect, cursor: Any) -> list[Backlog]:
    """Per destination: the subscribed events after its cursor plus its pending exception
    rows (pending), its dead letters, and the oldest pending event's time."""
    # Every event past the cursor, readable or not yet: on PostgreSQL those beyond the
    # horizon (held back by a transaction open anywhere on the server) are undelivered too,
    # and their age is the lag that must show (/metrics, /healthz) while they wait.
    stream = f"FROM outbox_events e WHERE {_past(d, c='c')} AND {_SUBSCRIBED}"
    rows = "FROM outbox_deliveries o WHERE o.destination_id = ds.id AND o.state"
    cursor.execute(
        d.sql(
            f"SELECT {', '.join(f'ds.{c}' for c in _COLUMNS)}, "
            f"(SELECT COUNT(*) {stream}), (SELECT MIN(e.created_at) {stream}), "
            f"(SELECT COUNT(*) {rows} = 'pending'), (SELECT MIN(o.created_at) {rows} = 'pending'), "
            f"(SELECT COUNT(*) {rows} = 'dead') "
            "FROM event_destinations ds LEFT JOIN outbox_cursors c ON c.destination_id = ds.id "
            "ORDER BY ds.id"
        ),
        [],
    )
    found = []
    for row in cursor.fetchall():
        streamed, first_streamed, pending, first_pending, dead = row[len(_COLUMNS) :]
        oldest = [t for t in map(parse_utc, (first_streamed, first_pending)) if t is not None]
        found.append(
            Backlog(
                _destination(row[: len(_COLUMNS)]),
                int(streamed or 0) + int(pending or 0),
                int(dead or 0),
                min(oldest) if oldest else None,
            )
        )
    return found


@dataclass(frozen=True)
class DeliveryRow:
    event_id: str
    type: str
    destination: str
    state: str
    attempts: int
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


def deliveries(
    d: Dialect, cursor: Any, *, state: str | None, limit: int, order_id: uuid.UUID | None = None
) -> list[DeliveryRow]:
    """Deliveries, newest first: state "dead" from the exception rows; otherwise one per
    (event, subscribed destination) since the destination was added: its exception row's
    state and attempts if it has one, else delivered (1 attempt) once its cursor passed
    the event, else pending (0)."""
    if state == "dead":
        where, params = ["o.state = 'dead'"], []
        if order_id is not None:
            where.append("o.order_id = %s")
            params.append(d.uuid(order_id))
        cursor.execute(
            d.sql(
                "SELECT o.event_id, e.type, ds.name, o.state, o.attempts, o.last_error, "
                "o.created_at, o.delivered_at FROM outbox_deliveries o "
                "JOIN outbox_events e ON e.id = o.event_id "
                "JOIN event_destinations ds ON ds.id = o.destination_id "
                f"WHERE {' AND '.join(where)} "
                "ORDER BY o.created_at DESC, o.seq DESC, ds.id LIMIT %s"
            ),
            [*params, limit],
        )
    else:
        # Past the cursor (beyond the horizon or not): pending.
        stream_state = f"CASE WHEN {_past(d, c='c')} THEN 'pending' ELSE 'delivered' END"
        where = [f"(o.event_id IS NOT NULL OR ({_SUBSCRIBED} AND e.created_at >= ds.created_at))"]
        params = []
        if order_id is not None:
            where.append("e.order_id = %s")
            params.append(d.uuid(order_id))
        listed = (
            f"SELECT e.id, e.type, ds.name, COALESCE(o.state, {stream_state}) AS state, "
            # No exception row: delivered on its first attempt (a failure writes one), or
            # not tried yet.
            f"COALESCE(o.attempts, CASE WHEN {stream_state} = 'delivered' THEN 1 ELSE 0 END), "
            "o.last_error, e.created_at, o.delivered_at, "
            "e.position, ds.id AS destination FROM outbox_events e "
            "CROSS JOIN event_destinations ds JOIN outbox_cursors c ON c.destination_id = ds.id "
            "LEFT JOIN outbox_deliveries o ON o.destination_id = ds.id AND o.event_id = e.id "
            f"WHERE {' AND '.join(where)}"
        )
        if state is not None:
            listed = f"SELECT * FROM ({listed}) listed WHERE state = %s"
            params.append(state)
        cursor.execute(
            d.sql(f"{listed} ORDER BY 9 DESC, 10 LIMIT %s"),
            [*params, limit],
        )
    return [
        DeliveryRow(r[0], r[1], r[2], r[3], r[4], r[5], _time(r[6]), parse_utc(r[7]))
        for r in cursor.fetchall()
    ]


def events_of(d: Dialect, cursor: Any, *, order_id: uuid.UUID) -> list[tuple[str, str, str]]:
    """(id, type, body) of one order's events, in order."""
    cursor.execute(
        d.sql("SELECT id, type, body FROM outbox_events WHERE order_id = %s ORDER BY seq"),
        [d.uuid(order_id)],
    )
    return [tuple(r) for r in cursor.fetchall()]


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _time(value: Any) -> datetime:
    found = parse_utc(value)
    assert found is not None
    return found
