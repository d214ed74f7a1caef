"""Read-only SQL for the operator's views (the /ui pages and `order-saga orders`): orders
filtered by status, state, product, user and age with parked ones first; counts by status;
time spent in each state; the heatmap of the whole machine. Never writes.

The heatmap is one query over the append-only log: a window function pairs each
transition with the next one of the same order and scope (the time spent in the state it
entered), and nearest-rank percentiles are taken with ROW_NUMBER, portable between SQLite
and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Float, case, cast, func, literal_column, select, union_all

from fsm.machine import Status
from fsm.models import STATE_COLUMN, Order, OrderTable, Transition, TransitionTable
from fsm.sql import as_utc
from fsm.store import Store, utcnow

orders = OrderTable.__table__  # type: ignore[attr-defined]
transitions = TransitionTable.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class OrderFilter:
    status: str | None = None
    state: str | None = None
    product_id: int | None = None
    user_id: int | None = None
    older_than: float | None = None  # seconds since the order last moved
    limit: int = 50
    offset: int = 0


def list_orders(store: Store, flt: OrderFilter) -> tuple[list[Order], int]:
    """One page of matching orders, parked (needs_attention) first, then newest first;
    and how many match in all."""
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
    parked_first = case((orders.c.status == Status.NEEDS_ATTENTION.value, 0), else_=1)
    query = (
        select(orders.c.id)
        .where(*conditions)
        .order_by(parked_first, orders.c.created_at.desc(), orders.c.id)
        .limit(flt.limit)
        .offset(flt.offset)
    )
    total_query = select(func.count()).select_from(orders).where(*conditions)
    with store.engine.connect() as conn:
        ids = [row.id for row in conn.execute(query)]
        total = int(conn.execute(total_query).scalar_one())
    return [store.get(order_id) for order_id in ids], total


def counts_by_status(store: Store) -> dict[str, int]:
    """Every coarse status with its count (zero included), in the machine's order."""
    found = store.count_by_status()
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


def _seconds(store: Store, later: Any, earlier: Any) -> Any:
    if store.is_postgres:
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def heat(store: Store) -> Heat:
    """Count, p50/p95 time spent and current occupancy for every state; count per edge."""
    t = transitions
    left = func.lead(t.c.created_at).over(partition_by=(t.c.order_id, t.c.scope), order_by=t.c.seq)
    stays = select(
        t.c.scope, t.c.to_state.label("state"), t.c.created_at.label("entered"), left.label("left")
    ).subquery()
    secs = select(
        stays.c.scope,
        stays.c.state,
        cast(_seconds(store, stays.c.left, stays.c.entered), Float).label("secs"),
    ).subquery()
    ranked = (
        select(
            secs.c.scope,
            secs.c.state,
            secs.c.secs,
            func.row_number()
            .over(partition_by=(secs.c.scope, secs.c.state), order_by=secs.c.secs)
            .label("rn"),
            func.count().over(partition_by=(secs.c.scope, secs.c.state)).label("n"),
        )
        .where(secs.c.secs.is_not(None))
        .subquery()
    )
    percentiles = select(
        ranked.c.scope,
        ranked.c.state,
        func.min(case((ranked.c.rn >= ranked.c.n * 0.5, ranked.c.secs))).label("p50"),
        func.min(case((ranked.c.rn >= ranked.c.n * 0.95, ranked.c.secs))).label("p95"),
    ).group_by(ranked.c.scope, ranked.c.state)
    entered = select(t.c.scope, t.c.to_state, func.count()).group_by(t.c.scope, t.c.to_state)
    edge_counts = select(t.c.scope, t.c.trigger, t.c.from_state, t.c.to_state, func.count())
    edge_counts = edge_counts.group_by(t.c.scope, t.c.trigger, t.c.from_state, t.c.to_state)
    occupancy = union_all(
        *(
            select(
                literal_column(f"'{scope}'").label("scope"), orders.c[col], func.count()
            ).group_by(orders.c[col])
            for scope, col in STATE_COLUMN.items()
        )
    )
    with store.engine.connect() as conn:
        passed = {(s, st): int(n) for s, st, n in conn.execute(entered)}
        now = {(s, st): int(n) for s, st, n in conn.execute(occupancy)}
        pct = {(r.scope, r.state): (r.p50, r.p95) for r in conn.execute(percentiles)}
        edges = {(s, tr, a, b): int(n) for s, tr, a, b, n in conn.execute(edge_counts)}
    keys = passed.keys() | now.keys() | pct.keys()
    states = {
        k: StateHeat(passed.get(k, 0), now.get(k, 0), *pct.get(k, (None, None))) for k in keys
    }
    return Heat(states=states, edges=edges)


def age(moment: datetime | None) -> float | None:
    """Seconds since `moment` (UTC)."""
    moment = as_utc(moment)
    return None if moment is None else (utcnow() - moment).total_seconds()
