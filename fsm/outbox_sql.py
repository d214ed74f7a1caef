"""The outbox's SQL: the statements that write an event and fan it out to every subscribed
destination in the transition's own commit, and the relay's and the operator's statements
(claim, settle, dead-letter, redeliver, list). Statement texts and cursor ops only; no
decisions (fsm.relay decides retry or dead letter), no sending.

Work is found by state, never by a cursor: each (destination, event) has its own row,
written in the event's commit, so an event whose transaction commits after a later-numbered
one is still found (the auto-increment trap). An order's event is claimed only when every
earlier event of that order to that destination is delivered: in order per order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from fsm.sql import TRANSITION_COLUMNS, Dialect, _quoted, as_utc

EVENT_COLUMNS = ("id", "order_id", "seq", "type", "created_at", "body")
_EVENT_MARKS = ", ".join(["%s"] * len(EVENT_COLUMNS))
# The pattern is an expression (a CAST), not a bare parameter: SQLite compiles `col LIKE ?`
# for the value bound and prepares the statement again whenever that value changes (with
# the event type, every other event): 50-60 us of the engine's writer per event, as much as
# the two deliveries' rows themselves (BENCHMARKS.md, "Relay: the database's share").
_FAN = (
    "INSERT INTO outbox_deliveries (destination_id, event_id, order_id, seq, state, attempts, "
    "next_attempt_at, created_at, retry_from) "
    "SELECT d.id, %s, %s, %s, 'pending', 0, %s, %s, %s FROM {source} event_destinations d "
    "WHERE d.events LIKE CAST(%s AS TEXT)"
)


@dataclass(frozen=True)
class EventRow:
    """An event as the store writes it (values already encoded for the driver)."""

    params: tuple[Any, ...]  # EVENT_COLUMNS
    fan: tuple[Any, ...]  # event id, order id, seq, now x3, LIKE pattern


# -- the hot path: the event in the transition's commit -----------------------------------


@lru_cache(maxsize=8)
def insert_event(d: Dialect) -> str:
    return d.sql(f"INSERT INTO outbox_events ({', '.join(EVENT_COLUMNS)}) VALUES ({_EVENT_MARKS})")


@lru_cache(maxsize=8)
def fan_out(d: Dialect) -> str:
    return d.sql(_FAN.format(source=""))


@lru_cache(maxsize=128)
def move_with_event(columns: tuple[str, ...]) -> str:
    """PostgreSQL: the guarded UPDATE, its transition row, the event and its deliveries in
    one statement; its row count is 1 when all happened, 0 when none did."""
    sets = ", ".join(f"{c} = %s" for c in columns)
    names = ", ".join(_quoted(c) for c in TRANSITION_COLUMNS)
    marks = ", ".join(["%s"] * len(TRANSITION_COLUMNS))
    return (
        f"WITH moved AS (UPDATE orders SET {sets} "
        "WHERE id = %s AND version = %s AND lease_owner = %s RETURNING id), "
        f"logged AS (INSERT INTO transitions ({names}) SELECT {marks} FROM moved "
        "RETURNING order_id), "
        f"fanned AS ({_FAN.format(source='logged,')}) "
        f"INSERT INTO outbox_events ({', '.join(EVENT_COLUMNS)}) SELECT {_EVENT_MARKS} FROM logged"
    )


@lru_cache(maxsize=8)
def create_with_event(columns: tuple[str, ...]) -> str:
    """PostgreSQL: insert the order (unless its id or key exists) with its `order.created`
    event and deliveries, in one statement; row count 1 when inserted."""
    marks = ", ".join(["%s"] * len(columns))
    return (
        f"WITH ins AS (INSERT INTO orders ({', '.join(columns)}) VALUES ({marks}) "
        "ON CONFLICT DO NOTHING RETURNING id), "
        f"fanned AS ({_FAN.format(source='ins,')}) "
        f"INSERT INTO outbox_events ({', '.join(EVENT_COLUMNS)}) SELECT {_EVENT_MARKS} FROM ins"
    )


def write_event(d: Dialect, cursor: Any, event: EventRow) -> None:
    """SQLite (in-process: no round trips to save): the event and its deliveries."""
    cursor.execute(insert_event(d), event.params)
    cursor.execute(fan_out(d), event.fan)


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


def due_ids(
    d: Dialect, cursor: Any, *, destination_id: int, now: datetime, limit: int
) -> tuple[list[str], bool]:
    """`due`, as a read outside the claiming transaction (SQLite: its search of the backlog,
    several ms under a backlog of thousands, then holds no write lock the engine's commits
    would wait for; `claim` leases those still due), and whether the destination has a
    dead letter (then `claim` must run: it sweeps the events behind one)."""
    stamp = d.timestamp(now)
    cursor.execute(due(d), [destination_id, stamp, stamp, limit])
    found = [r[0] for r in cursor.fetchall()]
    cursor.execute(d.sql(_ANY_DEAD), [destination_id])
    return found, cursor.fetchone() is not None


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
    `due_ids` saw them before this transaction (SQLite: the search holds no write lock);
    those still due are leased."""
    stamp = d.timestamp(now)
    # An event committed after an earlier one of its order was dead-lettered joins it (it
    # would not be claimed anyway: the earlier one is not delivered). Swept only while the
    # destination has a dead letter at all: an index probe, not a scan per claim.
    cursor.execute(d.sql(_ANY_DEAD), [destination_id])
    if cursor.fetchone() is not None:
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
    # The due ones found first (unless the caller found them: `found`), then leased by
    # primary key, their ids written out: as one statement (`IN (SELECT ...)` of the
    # LIMITed, SKIP LOCKED select) PostgreSQL planned the lookup as a scan of all the
    # destination's rows, delivered ones included, before the table had statistics.
    if found is None:
        cursor.execute(due(d), [destination_id, stamp, stamp, limit])
        found = [r[0] for r in cursor.fetchall()]
    if not found:
        return []
    # Each still due (found outside this transaction, one may have been leased, sent or
    # dead-lettered since): the same conditions as `due`, asked again of the listed rows.
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries AS d SET lease_owner = %s, lease_until = %s, "
            "attempts = attempts + 1 WHERE d.destination_id = %s "
            f"AND d.event_id IN ({', '.join(['%s'] * len(found))}) "
            "AND d.state = 'pending' AND d.next_attempt_at <= %s "
            f"AND (d.lease_until IS NULL OR d.lease_until < %s) AND {_FIRST_UNDELIVERED} "
            "RETURNING event_id, order_id, seq, attempts, created_at, retry_from"
        ),
        [owner, d.timestamp(lease_until), destination_id, *found, stamp, stamp],
    )
    rows = cursor.fetchall()
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
    claimed = [
        Claimed(
            event_id=r[0],
            order_id=_uuid(r[1]),
            seq=r[2],
            attempts=r[3],
            created_at=_time(r[4]),
            retry_from=_time(r[5]),
            type=bodies[r[0]][0],
            body=bodies[r[0]][1],
        )
        for r in rows
    ]
    return sorted(claimed, key=lambda c: (c.created_at, c.seq))


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


def dead_letter(
    d: Dialect, cursor: Any, *, destination_id: int, claimed: Claimed, error: str
) -> None:
    """The event, and the order's later events to this destination (they must not overtake
    it), are set aside until an operator redelivers them."""
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries SET state = 'dead', last_error = %s, "
            "lease_owner = NULL, lease_until = NULL "
            "WHERE destination_id = %s AND event_id = %s"
        ),
        [error[:500], destination_id, claimed.event_id],
    )
    cursor.execute(
        d.sql(
            "UPDATE outbox_deliveries SET state = 'dead', last_error = %s "
            "WHERE destination_id = %s AND order_id = %s AND seq > %s AND state = 'pending'"
        ),
        ["behind a dead letter", destination_id, d.uuid(claimed.order_id), claimed.seq],
    )


_REVIVE = (
    "UPDATE outbox_deliveries SET state = 'pending', next_attempt_at = %s, retry_from = %s, "
    "last_error = NULL, lease_owner = NULL, lease_until = NULL WHERE state = 'dead'"
)


def redeliver(d: Dialect, cursor: Any, *, event_id: str | None, now: datetime) -> int:
    """Dead letters back to pending: one event (with its order's later dead events to the
    same destinations, so order holds), or all. Returns how many."""
    stamp = d.timestamp(now)
    if event_id is None:
        cursor.execute(d.sql(_REVIVE), [stamp, stamp])
        return int(cursor.rowcount)
    order_id, seq = split_id(event_id)
    cursor.execute(
        d.sql(
            f"{_REVIVE} AND order_id = %s AND seq >= %s AND destination_id IN "
            "(SELECT destination_id FROM outbox_deliveries WHERE event_id = %s AND state = 'dead')"
        ),
        [stamp, stamp, d.uuid(order_id), seq, event_id],
    )
    return int(cursor.rowcount)


def split_id(event_id: str) -> tuple[uuid.UUID, int]:
    """`<order_id>:<seq>` -> its parts; ValueError when it is not an event id."""
    order, _, seq = event_id.rpartition(":")
    try:
        return uuid.UUID(order), int(seq)
    except ValueError:
        raise ValueError(f"{event_id!r} is not an event id (<order_id>:<seq>)") from None


# -- destinations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    id: int
    name: str
    kind: str
    url: str
    secret: str | None
    events: str


_DESTINATION = "SELECT id, name, kind, url, secret, events FROM event_destinations"


def destinations(d: Dialect, cursor: Any) -> list[Destination]:
    cursor.execute(d.sql(f"{_DESTINATION} ORDER BY id"))
    return [Destination(*row) for row in cursor.fetchall()]


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
    return Destination(*cursor.fetchone())


def remove_destination(d: Dialect, cursor: Any, *, destination_id: int) -> bool:
    cursor.execute(
        d.sql("DELETE FROM outbox_deliveries WHERE destination_id = %s"), [destination_id]
    )
    cursor.execute(d.sql("DELETE FROM event_destinations WHERE id = %s"), [destination_id])
    return bool(cursor.rowcount == 1)


# -- reads for the operator (metrics, /healthz, the console, `events list`) ---------------


@dataclass(frozen=True)
class Backlog:
    destination: Destination
    pending: int  # not yet delivered and not dead (in flight included)
    dead: int
    oldest_pending: datetime | None  # the lag is its age


def backlog(d: Dialect, cursor: Any) -> list[Backlog]:
    cursor.execute(
        d.sql(
            "SELECT ds.id, ds.name, ds.kind, ds.url, ds.secret, ds.events, "
            "SUM(CASE WHEN o.state = 'pending' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN o.state = 'dead' THEN 1 ELSE 0 END), "
            "MIN(CASE WHEN o.state = 'pending' THEN o.created_at END) "
            "FROM event_destinations ds LEFT JOIN outbox_deliveries o "
            "ON o.destination_id = ds.id AND o.state <> 'delivered' "
            "GROUP BY ds.id, ds.name, ds.kind, ds.url, ds.secret, ds.events ORDER BY ds.id"
        )
    )
    return [
        Backlog(Destination(*row[:6]), int(row[6] or 0), int(row[7] or 0), _time_or_none(row[8]))
        for row in cursor.fetchall()
    ]


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
    where, params = [], []
    if state is not None:
        where.append("o.state = %s")
        params.append(state)
    if order_id is not None:
        where.append("o.order_id = %s")
        params.append(d.uuid(order_id))
    cursor.execute(
        d.sql(
            "SELECT o.event_id, e.type, ds.name, o.state, o.attempts, o.last_error, "
            "o.created_at, o.delivered_at FROM outbox_deliveries o "
            "JOIN outbox_events e ON e.id = o.event_id "
            "JOIN event_destinations ds ON ds.id = o.destination_id "
            f"{'WHERE ' + ' AND '.join(where) if where else ''} "
            "ORDER BY o.created_at DESC, o.seq DESC, ds.id LIMIT %s"
        ),
        [*params, limit],
    )
    return [
        DeliveryRow(r[0], r[1], r[2], r[3], r[4], r[5], _time(r[6]), _time_or_none(r[7]))
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
    found = _time_or_none(value)
    assert found is not None
    return found


def _time_or_none(value: Any) -> datetime | None:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return as_utc(value)
