"""The heatmap (issue 18 §4): one load of `/ui/heatmap` (`fsm.rollup.refresh`, then
`fsm.queries.heat`) at 100,000 orders and ~1,000,000 transitions, per window (last hour,
last day, all), the median of several loads beside the 500 ms target; and the first fold
of the whole log into the roll-up. PostgreSQL, and SQLite at the same scale.

The log is bulk-loaded (COPY on PostgreSQL, SQLAlchemy's executemany on SQLite), not driven through
the engine: a million transitions would take the engine minutes. Its shape is the
engine's: every path is walked through the installed machines (`fsm.machine.next_state`),
so each row is an edge the engine could write, with the engine's scopes, triggers and
detail sizes. Orders are created evenly over the last week; most complete (9 transitions),
some are cancelled afterwards (17), fail and compensate (6-14), are rejected (2), are
parked and resolved by an operator (with the audit row), and ~1.5% are still live
(pending, running, compensating, parked). Each stay lasts a random, skewed time (tens of
milliseconds for a call, up to hours before a cancellation).
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine

from bench.common import Config, Row, orders_table, scratch_database
from fsm import queries, rollup
from fsm.engine import make_engine
from fsm.machine import (
    AUDIT_SCOPE,
    ORDER_MACHINE,
    STEP_MACHINE,
    coarse_status,
    next_state,
)
from fsm.migrate import upgrade
from fsm.models import STATE_COLUMN
from fsm.registry import STEP_NAMES
from fsm.version import MACHINE_VERSION

TARGET_MS = 500.0
WINDOWS: dict[str, timedelta | None] = {
    "last hour": timedelta(hours=1),
    "last day": timedelta(days=1),
    "all": None,
}
SPAN = timedelta(days=7)  # orders are created evenly over the last week
TRANSITION_COLUMNS = (
    "order_id", "seq", "scope", "trigger", "from_state", "to_state", "detail", "created_at",
    "machine_version", "order_created_at",
)  # fmt: skip


@dataclass
class Walk:
    """One order being walked through the machines: its states, clock and log."""

    id: uuid.UUID
    at: datetime
    rng: random.Random
    states: dict[str, str] = field(default_factory=dict)
    lines: list[tuple[Any, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.created = self.at
        self.states = dict.fromkeys(STATE_COLUMN, "pending")

    def wait(self, median: float) -> None:
        """Let a skewed random time pass (lognormal around `median` seconds)."""
        self.at += timedelta(seconds=self.rng.lognormvariate(0, 0.8) * median)

    def fire(self, scope: str, trigger: str, detail: dict[str, Any] | None = None) -> None:
        machine = ORDER_MACHINE if scope == "order" else STEP_MACHINE
        source = self.states[scope]
        dest = next_state(machine, source, trigger)  # raises for an edge the machine lacks
        self.states[scope] = dest
        self._line(scope, trigger, source, dest, detail)

    def audit(self, action: str, detail: dict[str, Any]) -> None:
        state = self.states["order"]
        self._line(AUDIT_SCOPE, action, state, state, detail)

    def _line(self, scope: str, trigger: str, a: str, b: str, detail: Any) -> None:
        seq = len(self.lines) + 1
        body = None if detail is None else json.dumps(detail)
        self.lines.append((self.id, seq, scope, trigger, a, b, body, self.at, MACHINE_VERSION))


def _call(walk: Walk, step: str, outcome: str) -> None:
    walk.fire(step, "request")
    walk.wait(0.08)  # one downstream call
    detail = {"status": 200, "body": {"id": walk.rng.randrange(10**6)}}
    if outcome != "succeed":
        detail = {"status": 409, "detail": "not enough stock"}
    walk.fire(step, outcome, detail)
    walk.wait(0.005)


def _compensate(walk: Walk, steps: list[str]) -> None:
    for step in reversed(steps):
        walk.fire(step, "compensate")
        walk.wait(0.08)
        walk.fire(step, "finish_compensation", {"status": 200, "body": {"undone": True}})
        walk.wait(0.005)


def _start(walk: Walk) -> None:
    walk.wait(0.02)  # from creation to the first driver
    walk.fire("order", "request_product")
    walk.wait(0.05)


def _found(walk: Walk) -> None:
    walk.fire("order", "product_found", {"product": {"id": 1, "price": 19.99}})
    walk.wait(0.005)


def walk_order(walk: Walk, kind: str) -> None:
    """Append to `walk` the log of one order of `kind`."""
    steps = list(STEP_NAMES)
    if kind == "pending":
        return
    _start(walk)
    if kind == "product_requested":
        return
    if kind == "rejected":
        walk.fire("order", "product_missing", {"status": 404, "detail": "no such product"})
        return
    _found(walk)
    if kind in ("completed", "cancelled"):
        for step in steps:
            _call(walk, step, "succeed")
        walk.fire("order", "all_succeeded", {"steps": dict.fromkeys(steps, "succeeded")})
        if kind == "cancelled":
            walk.wait(3 * 3600)  # the owner cancels hours later
            walk.fire("order", "cancel", {"by": "owner"})
            walk.wait(0.01)
            _compensate(walk, steps)
            walk.fire("order", "cancellation_done")
        return
    if kind == "running":  # a call in flight
        walk.fire(steps[0], "request")
        return
    failing = walk.rng.randrange(len(steps))
    for step in steps[:failing]:
        _call(walk, step, "succeed")
    _call(walk, steps[failing], "fail")
    walk.fire("order", "some_failed", {"steps": {steps[failing]: "failed"}})
    walk.wait(0.01)
    done = steps[:failing]
    if kind == "failed" or not done:
        _compensate(walk, done)
        walk.fire("order", "compensation_done")
        return
    if kind == "compensating":
        walk.fire(done[-1], "compensate")
        return
    # parked: the refund keeps failing; "resolved": an operator settled it by hand
    walk.fire(done[-1], "compensate")
    walk.wait(30.0)
    walk.fire("order", "park", {"reason": "refund failed 4 times: 503"})
    if kind == "resolved":
        walk.wait(2 * 3600)
        walk.audit("resolve", {"owner": "alice", "reason": "refunded by hand"})
        walk.fire("order", "resolve", {"reason": "refunded by hand"})


# (kind, share of orders); live ones (pending ... needs_attention) are the newest.
MIX = (
    ("completed", 0.745),
    ("cancelled", 0.12),
    ("failed", 0.08),
    ("rejected", 0.02),
    ("resolved", 0.02),
    ("needs_attention", 0.003),
    ("compensating", 0.003),
    ("running", 0.003),
    ("product_requested", 0.003),
    ("pending", 0.003),
)
LIVE = {"needs_attention", "compensating", "running", "product_requested", "pending"}


def generate(
    count: int, seed: int = 18, *, span: timedelta = SPAN
) -> Iterator[tuple[dict[str, Any], list[tuple[Any, ...]]]]:
    """`count` (order row, its transition lines), created evenly over `span` until now."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    kinds, weights = zip(*MIX, strict=True)
    base = _order_base()
    for i in range(count):
        kind = rng.choices(kinds, weights)[0]
        created = now - span + span * (i / count)
        if kind in LIVE:  # still live: created within the last ten minutes
            created = now - timedelta(seconds=rng.uniform(1, 600))
        walk = Walk(uuid.UUID(int=rng.getrandbits(128), version=4), created, rng)
        walk_order(walk, kind)
        if walk.lines and walk.at > now:  # a long stay would end in the future: shift back
            shift = walk.at - now + timedelta(seconds=1)
            walk.lines = [(*ln[:7], ln[7] - shift, ln[8]) for ln in walk.lines]
            walk.created -= shift
        last = walk.lines[-1][7] if walk.lines else walk.created
        order = {
            **base,
            "id": walk.id,
            "state": walk.states["order"],
            "status": coarse_status(walk.states["order"]).value,
            **{STATE_COLUMN[s]: walk.states[s] for s in STATE_COLUMN if s != "order"},
            "created_at": walk.created,
            "updated_at": last,
        }
        if kind == "needs_attention":
            order["attention_reason"] = "refund failed 4 times: 503"
        yield order, walk.lines


def _order_base() -> dict[str, Any]:
    base: dict[str, Any] = {
        "user_id": 3,
        "product_id": 1,
        "quantity": 1,
        "idempotency_key": None,
        "amount": 1999,  # cents
        "shipping_address": "1 Main St",
        "expected_delivery": None,
        "version": 10,
        "lease_owner": None,
        "lease_expires_at": None,
        "attempts": {},
        "last_error": None,
        "next_attempt_at": None,
        "deadline_at": None,
        "attention_reason": None,
        "cancel_requested": False,
        "interruptions": 0,
        "machine_version": MACHINE_VERSION,
        "created_by": "",
    }
    columns = orders_table().c
    missing = [
        c.name for c in columns if c.name not in base and c.name not in STATE_COLUMN.values()
    ]
    extra = {"id", "status", "created_at", "updated_at"}
    if set(missing) - extra:
        raise RuntimeError(f"bench.heatmap: orders has columns it does not fill: {missing}")
    return {k: v for k, v in base.items() if k in columns}


def _batches(
    count: int, size: int = 5_000, **how: Any
) -> Iterator[tuple[list[dict[str, Any]], list[Any]]]:
    orders: list[dict[str, Any]] = []
    lines: list[Any] = []
    for order, log in generate(count, **how):
        orders.append(order)
        lines += [(*line, order["created_at"]) for line in log]  # the partition key
        if len(orders) >= size:
            yield orders, lines
            orders, lines = [], []
    if orders:
        yield orders, lines


def load_postgres(url: str, count: int) -> int:
    """COPY `count` orders and their logs in; VACUUM ANALYZE as autovacuum would have.
    Returns the number of transitions."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    columns = list(orders_table().c.keys())
    n = 0
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur:
            for orders, lines in _batches(count):
                with cur.copy(f"COPY orders ({', '.join(columns)}) FROM STDIN") as copy:
                    for order in orders:
                        row = {**order, "attempts": json.dumps(order["attempts"])}
                        copy.write_row([row[c] for c in columns])
                with cur.copy(
                    f"COPY transitions ({', '.join(TRANSITION_COLUMNS)}) FROM STDIN"
                ) as copy:
                    for line in lines:
                        copy.write_row(line)
                n += len(lines)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE orders")
        conn.execute("VACUUM ANALYZE transitions")
    return n


def load_rows(url: str, count: int, **how: Any) -> int:
    """The same rows through SQLAlchemy's own types (so the app reads them back as it
    reads its own; any database, SQLite's bench and the tests), in large transactions;
    then ANALYZE. Returns the transitions. `how`: `generate`'s seed and span."""
    from sqlmodel import SQLModel

    table = SQLModel.metadata.tables["transitions"]
    engine = create_engine(url)
    n = 0
    try:
        for orders, lines in _batches(count, **how):
            rows = [dict(zip(TRANSITION_COLUMNS, line, strict=True)) for line in lines]
            for row in rows:
                row["detail"] = None if row["detail"] is None else json.loads(row["detail"])
            with engine.begin() as conn:
                conn.execute(orders_table().insert(), orders)
                conn.execute(table.insert(), rows)
            n += len(rows)
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    return n


def time_heat(engine: Engine, since: timedelta | None, runs: int) -> tuple[float, int]:
    """Median milliseconds of one heatmap load (`/ui/heatmap`: `rollup.refresh`, then
    `queries.heat`) over `runs` (after one warm-up); how many transitions into states it
    counted (a check that it read the window)."""
    reads = queries.Reads(engine)
    cutoff = None if since is None else queries.utcnow() - since
    heat = queries.heat(reads, since=cutoff)  # warm-up: the cache, the plan
    took = []
    for _ in range(runs):
        began = time.perf_counter()
        rollup.refresh(engine)
        queries.heat(reads, since=cutoff)
        took.append((time.perf_counter() - began) * 1000)
    entered = sum(s.entered for (scope, state), s in heat.states.items() if state != "pending")
    return statistics.median(took), entered


def run(cfg: Config) -> list[Row]:
    count = cfg.n(100_000, 5_000)
    runs = cfg.n(7, 3)
    rows = []
    for kind in reversed(cfg.databases()):  # PostgreSQL first: the figure the issue names
        with scratch_database(cfg, kind, "heatmap") as url:
            upgrade(url)
            began = time.monotonic()
            n = load_postgres(url, count) if kind == "postgresql" else load_rows(url, count)
            loaded = time.monotonic() - began
            engine = make_engine(url)
            try:
                began = time.monotonic()
                folded = rollup.roll(engine)
                first = time.monotonic() - began
                rows.append(
                    Row(
                        what=f"heatmap roll-up, {kind}: first fold of the whole log "
                        f"({folded:,} transitions, once after the upgrade)",
                        value=f"{first:.1f} s ({folded / first:,.0f}/s)" if first else "-",
                        reference=f"bulk load (COPY) took {loaded:.0f} s"
                        if kind == "postgresql"
                        else f"bulk load took {loaded:.0f} s",
                    )
                )
                for label, since in WINDOWS.items():
                    ms, entered = time_heat(engine, since, runs)
                    rows.append(
                        Row(
                            what=f"heatmap load, {kind}, window {label} ({count:,} orders, "
                            f"{n:,} transitions; {entered:,} in the window)",
                            value=f"{ms:,.0f} ms (median of {runs})",
                            ratio=f"{ms / TARGET_MS:.0%} of target",
                            target=f"< {TARGET_MS:.0f} ms"
                            + (" (issue 18, PostgreSQL)" if kind == "postgresql" else ""),
                        )
                    )
            finally:
                engine.dispose()
    return rows
