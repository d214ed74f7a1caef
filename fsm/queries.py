"""Every read of the engine's database, none of its writes: one order, its log, orders
found by key or as stuck, `list_orders` (the API's and the operator's, filtered by status,
state, product, user and age), counts by status, time spent in each state, the heatmap of
the whole machine, and the start-up check's grouped query (`fsm.upgrade`).

Reads are plain functions on SQLAlchemy's pool, for the API's worker threads and the CLI;
async code calls them through `asyncio.to_thread`. `Reads` holds the engine; `fsm.store`'s
`Store` is one (so a holder of the store reads through it).

The heatmap reads the roll-up `fsm.rollup` keeps of the append-only log (per edge, a
histogram of the stays it ended; all time and per hour) plus the few transitions the
roll-up does not hold, in one statement; nearest-rank percentiles are taken from the
histograms in Python, the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Integer,
    String,
    Text,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
    union_all,
)
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError

from fsm import sql
from fsm.errors import CorruptOrder, OrderNotFound, store_unavailable
from fsm.machine import AUDIT_SCOPE, Status
from fsm.models import (
    STATE_COLUMN,
    AttemptTable,
    HeatCursorTable,
    HeatHourTable,
    HeatTotalTable,
    Order,
    OrderTable,
    Transition,
    TransitionTable,
)
from fsm.sql import as_utc, parse_utc

log = logging.getLogger("order_saga.queries")
orders = OrderTable.__table__  # type: ignore[attr-defined]
transitions = TransitionTable.__table__  # type: ignore[attr-defined]
_TIMESTAMPS = ("lease_expires_at", "next_attempt_at", "deadline_at", "created_at", "updated_at")
_INTEGERS = ("user_id", "product_id", "quantity", "amount", "version", "interruptions")


def _raw(table: Any) -> list[Any]:
    """A table's columns with its JSON as the stored text and its timestamps as the driver
    hands them (SQLite: text; PostgreSQL: datetimes), parsed by `order_of_row` and
    `_transition`. SQLAlchemy's own result processors raise while the rows are fetched, so
    one broken value (a hand edit, a botched migration) would take every row of the read
    down with it instead of being reported as that order's corruption."""

    def raw(column: Any) -> Any:
        if isinstance(column.type, JSON):  # text on PostgreSQL too: parsed once, by us
            return cast(column, Text).label(column.name)
        if isinstance(column.type, DateTime):
            return type_coerce(column, String).label(column.name)
        return column

    return [raw(c) for c in table.c]


ORDER_ROW = _raw(orders)
TRANSITION_ROW = _raw(transitions)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class OrderFilter:
    status: str | None = None
    state: str | None = None
    product_id: int | None = None
    user_id: int | None = None
    older_than: float | None = None  # seconds since the order last moved
    id_prefix: str | None = None  # hex digits (dashes ignored): the start of an order id
    limit: int = 50
    offset: int = 0
    cursor: str | None = None  # `Page.next_cursor` of the previous page (then offset is 0)
    # The console's offset pages only: a cursor pages newest first, by what never changes.
    parked_first: bool = False
    created_by: str | None = None  # a client key's own orders only (issue 17)


class Reads:
    """Read-only access to the orders and their log through SQLAlchemy's pool."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    def _rows(self, query: Any) -> Sequence[Any]:
        try:
            with self.engine.connect() as conn:
                return conn.execute(query).all()
        except SQLAlchemyOperationalError as exc:
            raise store_unavailable("database unavailable", exc.orig) from exc

    def get(self, order_id: uuid.UUID) -> Order:
        rows = self._rows(select(*ORDER_ROW).where(orders.c.id == order_id))
        if not rows:
            raise OrderNotFound(f"order {order_id} not found")
        return order_of_row(rows[0])

    def created_by(self, order_id: uuid.UUID) -> object:
        """Who placed the order: its `created_by` as stored, read alone, so the owner of a
        row that cannot be decoded is known too (`api.deps.visible`). OrderNotFound."""
        rows = self._rows(select(orders.c.created_by).where(orders.c.id == order_id))
        if not rows:
            raise OrderNotFound(f"order {order_id} not found")
        creator: object = rows[0][0]
        return creator

    def find_by_idempotency_key(self, key: str, *, created_by: str = "") -> Order | None:
        rows = self._rows(
            select(*ORDER_ROW).where(
                orders.c.idempotency_key == key, orders.c.created_by == created_by
            )
        )
        return order_of_row(rows[0]) if rows else None

    def history(self, order_id: uuid.UUID) -> list[Transition]:
        # With its order's creation time PostgreSQL reads one partition (fsm.partitions).
        created = select(orders.c.created_at).where(orders.c.id == order_id).scalar_subquery()
        query = select(*TRANSITION_ROW).where(
            transitions.c.order_id == order_id, transitions.c.order_created_at == created
        )
        return [transition_of_row(r) for r in self._rows(query.order_by(transitions.c.seq))]

    def oldest_unmoved_by_state(self) -> dict[str, float]:
        """Per non-terminal state holding orders: seconds since its longest-still order
        last moved (the gauge alerts on stuck orders read this at scrape time)."""
        query = (
            select(orders.c.state, type_coerce(func.min(orders.c.updated_at), String))
            .where(orders.c.state.in_(sql.RESUMABLE))
            .group_by(orders.c.state)
        )
        now = utcnow()
        found: dict[str, float] = {}
        for state, raw in self._rows(query):
            moved = _timestamp_or_none(raw)  # a corrupt one is the orders views' to report
            if moved is not None:
                found[state] = max(0.0, (now - moved).total_seconds())
        return found

    def count_held(self, limit: int) -> int:
        """Live orders held for an operator (Order.held at `limit`; 0: none are). Through
        the partial index ix_orders_interrupted: its own predicate, spelt as it is, is what
        lets SQLite use it (PostgreSQL proves it from the other)."""
        if limit <= 0:
            return 0
        query = (
            select(func.count())
            .select_from(orders)
            .where(
                text("interruptions > 0"),
                orders.c.interruptions >= limit,
                orders.c.state.in_(sql.RESUMABLE),
            )
        )
        return int(self._rows(query)[0][0])

    def count_by_status(self) -> dict[str, int]:
        query = select(orders.c.status, func.count()).group_by(orders.c.status)
        return {status: int(n) for status, n in self._rows(query)}

    def _stuck(self, *, moved_before: datetime, now: datetime, due_only: bool) -> Any:
        handed_back = and_(orders.c.lease_owner.is_(None), orders.c.lease_expires_at.is_not(None))
        query = select(*ORDER_ROW).where(
            orders.c.state.in_(sql.RESUMABLE),
            or_(  # the claim's rule (fsm.sql.claim_batch)
                handed_back,
                and_(
                    or_(
                        orders.c.updated_at <= moved_before,
                        orders.c.state == sql.PARKED if not due_only else false(),
                    ),
                    or_(orders.c.lease_owner.is_(None), orders.c.lease_expires_at < now),
                ),
            ),
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
        with `due_only`, only those whose next retry time has come, else parked ones at any
        age too (as fsm.sql.claim_batch). Corrupt rows skipped."""
        query = self._stuck(moved_before=moved_before, now=utcnow(), due_only=due_only)
        usable = []
        for row in self._rows(query.order_by(orders.c.updated_at).limit(limit)):
            try:
                usable.append(order_of_row(row))
            except CorruptOrder as exc:
                log.error("skipping: %s", exc)
        return usable

    def count_leased_stuck(self, *, moved_before: datetime) -> int:
        """Non-terminal orders that another driver currently holds."""
        query = (
            select(func.count())
            .select_from(orders)
            .where(
                orders.c.state.in_(sql.RESUMABLE),
                orders.c.updated_at <= moved_before,
                orders.c.lease_owner.is_not(None),
                orders.c.lease_expires_at >= utcnow(),
            )
        )
        return int(self._rows(query)[0][0])


def _excerpt(value: Any) -> str:
    return repr(value)[:60]


def order_of_row(row: Any) -> Order:
    """A row of `ORDER_ROW` as an Order; CorruptOrder if it is not one."""
    data = dict(getattr(row, "_mapping", row))
    for key in _TIMESTAMPS:
        try:
            data[key] = parse_utc(data[key])
        except ValueError:
            raise CorruptOrder(
                f"order {data['id']} is corrupt: {key} = {_excerpt(data[key])} is not a timestamp"
            ) from None
    for key in _INTEGERS:  # SQLite keeps any text in an INTEGER column
        if data[key] is not None and type(data[key]) is not int:
            raise CorruptOrder(
                f"order {data['id']} is corrupt: {key} = {_excerpt(data[key])} is not an integer"
            )
    if data["attempts"] is not None:
        try:
            data["attempts"] = json.loads(data["attempts"])
        except ValueError:
            raise CorruptOrder(
                f"order {data['id']} is corrupt: attempts = {_excerpt(data['attempts'])} "
                "is not JSON"
            ) from None
    return sql.order_from(data)


def transition_of_row(row: Any) -> Transition:
    """A row of `TRANSITION_ROW` as a Transition. Its states are kept as written (the log
    holds older machines' moves too); a detail that is not a JSON object, or holds a lone
    surrogate (`\\ud800`: no UTF-8 answer could carry it), is kept as its text,
    `{"unreadable": ...}`, so an old order's history stays readable. CorruptOrder if its
    `seq` is not an integer or a timestamp is not one (the log's order is lost)."""
    data = dict(row._mapping)
    if type(data["seq"]) is not int:
        raise CorruptOrder(
            f"order {data['order_id']} is corrupt: transition seq = {_excerpt(data['seq'])} "
            "is not an integer"
        )
    text = data["detail"]
    if text is not None:
        try:
            detail = json.loads(text)
        except ValueError:
            detail = text
        if detail is not None and (not isinstance(detail, dict) or _lone_surrogate(text, detail)):
            detail = {"unreadable": text[:200]}
        data["detail"] = detail
    for key in ("created_at", "order_created_at"):
        try:
            data[key] = parse_utc(data[key])
        except ValueError:
            raise CorruptOrder(
                f"order {data['order_id']} is corrupt: transition {data['seq']} {key} = "
                f"{_excerpt(data[key])} is not a timestamp"
            ) from None
    return Transition(**data)


def _lone_surrogate(text: str, detail: dict[str, Any]) -> bool:
    """`detail` (decoded from `text`) holds a lone surrogate: only ever from an escape, so
    a detail without `\\u` costs one scan."""
    if "\\u" not in text:
        return False
    try:
        json.dumps(detail, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True)
class Unreadable:
    """A row the installed machine cannot read (a state it does not declare, a broken
    column): listed as what it is, never guessed into an `Order`, never driven."""

    id: uuid.UUID
    status: str
    state: str  # the raw value in the row
    why: str
    created_at: datetime | None
    updated_at: datetime | None


@dataclass(frozen=True)
class Page:
    """One page of a listing: orders (and unreadable rows, in their place), how many match
    in all, and the cursor of the next page (None on the last)."""

    items: list[Order | Unreadable]
    total: int
    next_cursor: str | None = None

    @property
    def orders(self) -> list[Order]:
        return [o for o in self.items if isinstance(o, Order)]

    @property
    def unreadable(self) -> list[Unreadable]:
        return [o for o in self.items if isinstance(o, Unreadable)]


class BadCursor(ValueError):
    """A cursor this code did not hand out."""


class BadIdPrefix(ValueError):
    """An id prefix that is not the start of an order id."""


_AFTER_ALL = datetime.max.replace(tzinfo=UTC)


def _encode_cursor(created_at: datetime, order_id: uuid.UUID) -> str:
    # The first item was the parked flag, a key that changes (paging skipped or repeated
    # an order parked or resolved meanwhile): always 0 now, so older cursors still decode.
    raw = json.dumps([0, created_at.isoformat(), str(order_id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The sort key `_encode_cursor` wrote; BadCursor for anything else (a hand-made
    cursor must not reach the database: 1e400, 10**23 or a list where the id goes)."""
    bad = BadCursor(f"{cursor[:40]!r} is not a cursor of this listing")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        found = json.loads(raw)
    except ValueError:  # binascii.Error and JSONDecodeError are ValueErrors
        raise bad from None
    if not (isinstance(found, list) and len(found) == 3):
        raise bad
    parked, created_at, order_id = found
    if type(parked) is not int or parked not in (0, 1):  # bool is no flag either
        raise bad
    if not isinstance(created_at, str) or not isinstance(order_id, str):
        raise bad
    try:
        at, oid = datetime.fromisoformat(created_at), uuid.UUID(order_id)
    except ValueError:
        raise bad from None
    return at, oid


def _id_prefix(prefix: str) -> tuple[uuid.UUID, uuid.UUID]:
    """The range of ids starting with `prefix` (hex digits, dashes ignored)."""
    digits = prefix.replace("-", "").lower()
    if not 1 <= len(digits) <= 32 or any(c not in "0123456789abcdef" for c in digits):
        raise BadIdPrefix(f"{prefix[:40]!r} is not the start of an order id (hex digits)")
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def decode(row: Any) -> Order | Unreadable:
    """A row of `orders` as an Order, or as an Unreadable naming why it is not one."""
    try:
        return order_of_row({k: v for k, v in row._mapping.items() if k != "parked_key"})
    except CorruptOrder as exc:
        return Unreadable(
            id=row.id,
            status=str(row.status),
            state=str(row.state),
            why=str(exc),
            created_at=_timestamp_or_none(row.created_at),
            updated_at=_timestamp_or_none(row.updated_at),
        )


def _timestamp_or_none(value: Any) -> datetime | None:
    try:
        return parse_utc(value)
    except ValueError:
        return None


def list_orders(reads: Reads, flt: OrderFilter) -> Page:
    """One page of matching orders, newest first, with the total; an unreadable row is
    listed as such and the page goes on. A cursor pages by (created_at, id) alone, which
    never change, so following `next_cursor` sees every order that existed at the start
    once, whatever moves meanwhile. `flt.parked_first` (the console's offset pages) puts
    parked orders first and hands out no cursor. Raises BadCursor or BadIdPrefix for
    input it cannot use."""
    conditions: list[Any] = []
    if flt.status:
        conditions.append(orders.c.status == flt.status)
    if flt.state:
        conditions.append(orders.c.state == flt.state)
    if flt.product_id is not None:
        conditions.append(orders.c.product_id == flt.product_id)
    if flt.user_id is not None:
        conditions.append(orders.c.user_id == flt.user_id)
    if flt.older_than is not None:
        conditions.append(orders.c.updated_at <= utcnow() - timedelta(seconds=flt.older_than))
    if flt.created_by is not None:
        conditions.append(orders.c.created_by == flt.created_by)
    if flt.id_prefix:
        low, high = _id_prefix(flt.id_prefix)
        conditions.append(orders.c.id.between(low, high))
    # The sort key: (parked first,) newest first, then the id; a cursor is its last value.
    parked = case((orders.c.status == Status.NEEDS_ATTENTION.value, 0), else_=1)
    total_query = select(func.count()).select_from(orders).where(*conditions)
    query = select(*ORDER_ROW, parked.label("parked_key")).where(*conditions)
    offset = flt.offset
    if flt.cursor:
        if flt.parked_first:
            raise BadCursor("a cursor pages newest first, not parked first")
        created_at, after = _decode_cursor(flt.cursor)
        query = query.where(
            or_(
                orders.c.created_at < created_at,
                and_(orders.c.created_at == created_at, orders.c.id > after),
            )
        )
        offset = 0
    order_by = [orders.c.created_at.desc(), orders.c.id]
    query = query.order_by(*([parked, *order_by] if flt.parked_first else order_by))
    query = query.limit(flt.limit + 1).offset(offset)
    rows = reads._rows(query)
    total = int(reads._rows(total_query)[0][0])
    more, rows = len(rows) > flt.limit, rows[: flt.limit]
    items = [decode(row) for row in rows]
    cursor = None
    if more and rows and not flt.parked_first:
        last, at = rows[-1], items[-1].created_at
        # A created_at that is not a timestamp (SQLite only: a hand edit) sorts as text,
        # above every real one: the next page starts below it, after the latest time.
        # (Rows with other broken created_at values between it and that time are skipped.)
        cursor = _encode_cursor(at or _AFTER_ALL, last.id)
    return Page(items, total, cursor)


def counts_by_status(reads: Reads) -> dict[str, int]:
    """Every coarse status with its count (zero included), in the machine's order."""
    found = reads.count_by_status()
    return {status.value: found.get(status.value, 0) for status in Status}


@dataclass(frozen=True)
class Span:
    """One transition and how long its scope then stayed in the state it entered."""

    seq: int
    scope: str
    trigger: str
    from_state: str
    to_state: str
    at: datetime
    detail: dict[str, Any] | None
    seconds: float | None  # None: still there


def timeline(history: Sequence[Transition]) -> list[Span]:
    """The log with time in each state: until the same scope's next transition; None
    for the state each scope is in now."""
    ordered = sorted(history, key=lambda t: t.seq)
    later: dict[int, datetime] = {}
    last: dict[str, Transition] = {}
    for row in ordered:
        prev = last.get(row.scope)
        if prev is not None:
            later[prev.seq] = row.created_at
        last[row.scope] = row
    spans = []
    for row in ordered:
        end = later.get(row.seq)
        seconds = None if end is None else (end - row.created_at).total_seconds()
        spans.append(
            Span(
                row.seq,
                row.scope,
                row.trigger,
                row.from_state,
                row.to_state,
                row.created_at,
                row.detail,
                seconds,
            )
        )
    return spans


@dataclass(frozen=True)
class StateHeat:
    entered: int = 0  # transitions into the state (how many times an order passed)
    now: int = 0  # orders sitting there now
    p50: float | None = None  # seconds spent there, over completed stays
    p95: float | None = None


@dataclass(frozen=True)
class Heat:
    """The whole machine's traffic: per (scope, state) and per (scope, trigger, from, to)."""

    states: dict[tuple[str, str], StateHeat] = field(default_factory=dict)
    edges: dict[tuple[str, str, str, str], int] = field(default_factory=dict)


# -- the heatmap ----------------------------------------------------------------------------
# A stay (time a scope spent in a state) ends with the scope's next transition: each
# transition carries the stay in its `from_state`, measured from the scope's previous
# transition (none: the scope's first move). Stays are kept as log-scale buckets, 40 a
# decade: a percentile is its bucket's geometric middle, within 2.9% of the exact value.

BUCKETS_PER_DECADE = 40
MIN_BUCKET = -160  # 0.1 ms and shorter (a zero or negative stay: two processes' clocks)
NO_STAY = -1000  # the scope's first transition: it ended no stay
KEEP_HOURS = 48  # `heat_hours` kept: windows up to KEEP_HOURS - 1 hours use it
heat_totals = HeatTotalTable.__table__  # type: ignore[attr-defined]
heat_hours = HeatHourTable.__table__  # type: ignore[attr-defined]
heat_cursor = HeatCursorTable.__table__  # type: ignore[attr-defined]


def bucket(seconds: float) -> int:
    """The bucket of a stay of `seconds`: floor(40 log10 s), MIN_BUCKET at least."""
    if seconds <= 10 ** (MIN_BUCKET / BUCKETS_PER_DECADE):
        return MIN_BUCKET
    return max(MIN_BUCKET, math.floor(BUCKETS_PER_DECADE * math.log10(seconds)))


def bucket_seconds(b: int) -> float:
    """What a bucket stands for: the geometric middle of its range."""
    return float(10 ** ((b + 0.5) / BUCKETS_PER_DECADE))


def stay_bucket(at: datetime, entered: datetime | None) -> int:
    if entered is None:
        return NO_STAY
    later, earlier = as_utc(at), as_utc(entered)
    assert later is not None and earlier is not None
    return bucket((later - earlier).total_seconds())


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def nearest_rank(histogram: dict[int, int], percent: int) -> float | None:
    """The nearest-rank percentile (the ceil(percent% × n)-th smallest) of a histogram."""
    n = sum(histogram.values())
    if n == 0:
        return None
    rank, seen = -(-n * percent // 100), 0
    for b in sorted(histogram):
        seen += histogram[b]
        if seen >= rank:
            return bucket_seconds(b)
    raise AssertionError("unreachable")


def ended_stays(*conditions: Any) -> Any:
    """Transitions (the operator's audit rows aside) with the time their scope entered the
    state each leaves: the created_at of the same order's previous transition of the same
    scope (None: its first), one index probe on (order_id, seq, order_created_at) each."""
    t, p = transitions, transitions.alias("previous")
    entered = (
        select(p.c.created_at)
        .where(
            p.c.order_id == t.c.order_id,
            p.c.order_created_at == t.c.order_created_at,  # PostgreSQL: its one partition
            p.c.scope == t.c.scope,
            p.c.seq < t.c.seq,
        )
        .order_by(p.c.seq.desc())
        .limit(1)
        .scalar_subquery()
    )
    return select(
        t.c.scope,
        t.c.trigger,
        t.c.from_state,
        t.c.to_state,
        null().cast(Integer).label("bucket"),
        literal(1, Integer).label("n"),
        t.c.created_at,
        entered.label("entered"),
    ).where(t.c.scope != AUDIT_SCOPE, *conditions)


def _rolled(table: Any, *conditions: Any) -> Any:
    keys = (table.c.scope, table.c.trigger, table.c.from_state, table.c.to_state, table.c.bucket)
    stamp = null().cast(transitions.c.created_at.type)
    return (
        select(*keys, cast(func.sum(table.c.n), Integer).label("n"), stamp, stamp)
        .where(*conditions)
        .group_by(*keys)
    )


def heat(store: Reads, since: datetime | None = None) -> Heat:
    """Count, p50/p95 time spent and current occupancy for every state; count per edge.
    With `since`, the transitions from then on and the stays they ended (the occupancy is
    always now's). Orders enter `pending` when created (no transition leads there):
    counted from `orders`.

    One statement reads the roll-up (`fsm.rollup.roll`: all time, or whole hours of the
    window) and the log where the roll-up cannot answer: past its cursor, and the part of
    the window's first hour inside the window. Exact whether or not anything was rolled."""
    t = transitions

    def parts(rolled_id: int) -> list[Any]:
        unrolled = t.c.id > rolled_id
        if since is None:
            return [_rolled(heat_totals), ended_stays(unrolled)]
        if since >= utcnow() - timedelta(hours=KEEP_HOURS - 1):
            edge = hour_of(since)
            edge += timedelta(hours=1) if since != edge else timedelta()
            return [
                _rolled(heat_hours, heat_hours.c.hour >= edge),
                ended_stays(t.c.created_at >= since, t.c.created_at < edge),
                ended_stays(unrolled, t.c.created_at >= edge),
            ]
        return [ended_stays(t.c.created_at >= since)]  # older than the hours kept

    cursor = select(heat_cursor.c.rolled_id).where(heat_cursor.c.id == 1)
    created = select(func.count()).select_from(orders)
    if since is not None:
        created = created.where(orders.c.created_at >= since)
    state_columns = [orders.c[col] for col in STATE_COLUMN.values()]
    occupancy = select(*state_columns, func.count()).group_by(*state_columns)
    edges: dict[tuple[str, str, str, str], int] = defaultdict(int)
    stays: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    now: dict[tuple[str, str], int] = defaultdict(int)
    with store.engine.connect() as conn:
        while True:  # the cursor as a literal (an index range), unchanged around the read
            rolled_id = int(conn.execute(cursor).scalar_one_or_none() or 0)
            rows = conn.execute(union_all(*parts(rolled_id))).all()
            if int(conn.execute(cursor).scalar_one_or_none() or 0) == rolled_id:
                break  # else a roll committed meanwhile: the rows may count it twice
        for scope, trigger, a, b, bucket_, n, at, entered in rows:
            edges[(scope, trigger, a, b)] += n
            if bucket_ is None:
                bucket_ = stay_bucket(at, entered)
            if bucket_ != NO_STAY:
                stays[(scope, a)][bucket_] += n
        for row in conn.execute(occupancy):
            for scope, state in zip(STATE_COLUMN, row[:-1], strict=True):
                now[(scope, state)] += int(row[-1])
        pending = int(conn.execute(created).scalar_one())
    passed: dict[tuple[str, str], int] = defaultdict(int)
    for (scope, _, _, b), n in edges.items():
        passed[(scope, b)] += n
    passed[("order", "pending")] = pending
    keys = passed.keys() | now.keys() | stays.keys()
    states = {
        k: StateHeat(
            passed.get(k, 0),
            now.get(k, 0),
            nearest_rank(stays.get(k, {}), 50),
            nearest_rank(stays.get(k, {}), 95),
        )
        for k in keys
    }
    return Heat(states=states, edges=dict(edges))


def age(moment: datetime | None) -> float | None:
    """Seconds since `moment` (UTC)."""
    moment = as_utc(moment)
    return None if moment is None else (utcnow() - moment).total_seconds()


# -- the start-up check's grouped reads (fsm.upgrade) -------------------------------------

_STATE_KEYS = tuple(STATE_COLUMN.values())  # order state, then each step's, machine order


def live_state_groups(
    engine: Engine, *, terminal: Iterable[str]
) -> list[tuple[tuple[str, ...], str, int]]:
    """(state and step states, machine version, count) of every order not in `terminal`:
    one grouped query, so 100,000 orders come back as a handful of rows."""
    keys = [*(orders.c[c] for c in _STATE_KEYS), orders.c.machine_version]
    query = select(*keys, func.count()).where(orders.c.state.not_in(list(terminal))).group_by(*keys)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    n = len(_STATE_KEYS)
    return [(tuple(row[:n]), row[n], int(row[n + 1])) for row in rows]


def ids_by_states(
    engine: Engine, combos: set[tuple[str, ...]], limit: int
) -> dict[tuple[str, ...], list[str]]:
    """Up to `limit` order ids (oldest first) per combination of state and step states."""
    columns = [orders.c[c] for c in _STATE_KEYS]
    query = (
        select(orders.c.id, *columns)
        .where(tuple_(*columns).in_(sorted(combos)))
        .order_by(orders.c.created_at)
    )
    found: dict[tuple[str, ...], list[str]] = defaultdict(list)
    with engine.connect() as conn:
        for oid, *combo in conn.execute(query):
            ids = found[tuple(combo)]
            if len(ids) < limit:
                ids.append(str(oid))
    return dict(found)


attempts_table = AttemptTable.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Attempt:
    """One logged failed (or waiting) downstream call of an order."""

    order_id: uuid.UUID
    at: datetime
    call: str
    attempt: int
    error: str | None
    next_attempt_at: datetime | None
    waiting_on: str | None


def _attempt(row: Any) -> Attempt:
    return Attempt(
        order_id=row.order_id,
        at=as_utc(row.created_at) or row.created_at,
        call=row.call,
        attempt=row.attempt,
        error=row.error,
        next_attempt_at=as_utc(row.next_attempt_at),
        waiting_on=row.waiting_on,
    )


def attempts(reads: Reads, order_id: uuid.UUID) -> list[Attempt]:
    """The order's failed and waiting calls, oldest first (its timeline shows them)."""
    a = attempts_table
    query = select(a).where(a.c.order_id == order_id).order_by(a.c.id)
    with reads.engine.connect() as conn:
        return [_attempt(row) for row in conn.execute(query)]


def last_attempts(reads: Reads, order_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Attempt]:
    """The latest logged attempt of each of these orders (those that have one)."""
    if not order_ids:
        return {}
    a = attempts_table
    latest = select(func.max(a.c.id)).where(a.c.order_id.in_(order_ids)).group_by(a.c.order_id)
    with reads.engine.connect() as conn:
        rows = conn.execute(select(a).where(a.c.id.in_(latest.scalar_subquery())))
        return {row.order_id: _attempt(row) for row in rows}
