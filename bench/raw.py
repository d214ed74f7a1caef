"""The raw references: the benchmark saga's commits written by hand against the driver,
with nothing of the engine in between: one `sqlite3` connection (WAL +
`synchronous=NORMAL`) and one `psycopg` connection, on the real schema.

Per order, exactly the engine's commits on the success path: the order row's INSERT, then
one transaction per transition (request_product, product_found, three step requests,
three step outcomes, all_succeeded), each a version-guarded UPDATE of the order row plus
the INSERT of its transition row. The rows carry the same columns and similar JSON.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import BUYER, Config, Measured, Row, scratch_database
from bench.meter import Meter
from fsm.machine import coarse_status
from fsm.migrate import upgrade
from fsm.version import MACHINE_VERSION

PRODUCT = {"id": 1, "category": "gadgets", "description": "Widget", "price": 1999}
ADDRESS = "3 Oak Ave, Capital City"
# scope, trigger, from, to, extra columns, detail: the saga of one completed order.
SAGA: list[tuple[str, str, str, str, dict[str, Any], dict[str, Any] | None]] = [
    ("order", "request_product", "pending", "product_requested", {}, None),
    ("order", "product_found", "product_requested", "steps_running",
     {"amount": 1999, "deadline_at": None}, {"product": PRODUCT}),
    ("payment", "request", "pending", "requested", {}, None),
    ("inventory", "request", "pending", "requested", {}, None),
    ("shipping", "request", "pending", "requested", {}, None),
    ("payment", "succeed", "requested", "succeeded", {},
     {"user_id": 3, "order_id": "", "amount": 1999, "balance": 999_998_001}),
    ("inventory", "succeed", "requested", "succeeded", {},
     {"product_id": 1, "order_id": "", "quantity": 1, "remaining": 999_999}),
    ("shipping", "succeed", "requested", "succeeded",
     {"shipping_address": ADDRESS, "expected_delivery": "2026-12-01"},
     {"order_id": "", "status": "scheduled", "expected_delivery": "2026-12-01",
      "address": ADDRESS}),
    ("order", "all_succeeded", "steps_running", "completed", {},
     {"steps": {"payment": "succeeded", "inventory": "succeeded", "shipping": "succeeded"}}),
]  # fmt: skip
ORDER_COLUMNS = (
    "id, user_id, product_id, quantity, state, status, payment_state, inventory_state, "
    "shipping_state, version, lease_owner, lease_expires_at, attempts, cancel_requested, "
    "created_at, updated_at, machine_version, created_by"
)
TRANSITION_COLUMNS = (
    "order_id, seq, scope, trigger, from_state, to_state, detail, created_at, machine_version, "
    "order_created_at"
)
LEASE = timedelta(seconds=30)
OWNER = "raw-loop"


def _sql(mark: str) -> tuple[str, dict[tuple[str, str], str], str]:
    """INSERT order, UPDATE per (scope, trigger), INSERT transition, with `mark` params."""
    insert = f"INSERT INTO orders ({ORDER_COLUMNS}) VALUES ({', '.join([mark] * 18)})"
    updates = {}
    for scope, trigger, _, _, extra, _ in SAGA:
        column = "state" if scope == "order" else f"{scope}_state"
        sets = [column, "version", "updated_at", "lease_expires_at", *extra]
        if scope == "order":
            sets.append("status")
        assignments = ", ".join(f"{c} = {mark}" for c in sets)
        updates[scope, trigger] = (
            f"UPDATE orders SET {assignments} "
            f"WHERE id = {mark} AND version = {mark} AND lease_owner = {mark}"
        )
    log = f"INSERT INTO transitions ({TRANSITION_COLUMNS}) VALUES ({', '.join([mark] * 10)})"
    return insert, updates, log


def _loop(conn: Any, mark: str, count: int, deadline: float, *, sqlite: bool) -> int:
    """Run `count` sagas (or until the monotonic deadline); returns how many finished."""
    insert, updates, log = _sql(mark)

    def stamp(now: datetime) -> Any:  # what SQLAlchemy stores: SQLite text, PG timestamptz
        return str(now.replace(tzinfo=None)) if sqlite else now

    done = 0
    while done < count and time.monotonic() < deadline:
        oid = uuid.uuid4()
        key: Any = oid.hex if sqlite else oid
        now = created = datetime.now(UTC)
        conn.execute(insert, (key, BUYER["user_id"], BUYER["product_id"], BUYER["quantity"],
                              "pending", "pending", "pending", "pending", "pending", 0, OWNER,
                              stamp(now + LEASE), "{}", False, stamp(now), stamp(now),
                              MACHINE_VERSION, ""))  # fmt: skip
        conn.commit()
        for version, (scope, trigger, source, dest, extra, detail) in enumerate(SAGA, 1):
            now = datetime.now(UTC)
            values = [dest, version, stamp(now), stamp(now + LEASE)]
            values += [stamp(now + LEASE) if k == "deadline_at" else v for k, v in extra.items()]
            if scope == "order":
                values.append(coarse_status(dest).value)
            cursor = conn.execute(updates[scope, trigger], (*values, key, version - 1, OWNER))
            if cursor.rowcount != 1:
                raise RuntimeError(f"raw loop: guarded UPDATE matched {cursor.rowcount} rows")
            text = None if detail is None else json.dumps({**detail, "order_id": str(oid)})
            conn.execute(
                log,
                (key, version, scope, trigger, source, dest, text, stamp(now), MACHINE_VERSION,
                 stamp(created)),
            )  # fmt: skip
            conn.commit()
        done += 1
    return done


def _measured(meter: Meter, done: int, count: int) -> Measured:
    limit = meter.limit(meter.cores(), waits_on="commit latency (WAL write / fsync)")
    return Measured(done, meter.wall, planned=count, limit=limit)


def sqlite_loop(url: str, count: int, seconds: float) -> Measured:
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        meter = Meter()
        done = _loop(conn, "?", count, time.monotonic() + seconds, sqlite=True)
        return _measured(meter.stop(), done, count)
    finally:
        conn.close()


def pg_loop(url: str, count: int, seconds: float) -> Measured:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        meter = Meter()
        done = _loop(conn, "%s", count, time.monotonic() + seconds, sqlite=False)
        return _measured(meter.stop(), done, count)


def measure(cfg: Config, kind: str) -> tuple[Row, float]:
    """The raw loop on a fresh `kind` database: its row for the table and its orders/s."""
    count, seconds = cfg.n(1000, 100), cfg.seconds(45, 15)
    with scratch_database(cfg, kind, "raw") as url:
        upgrade(url)
        loop = sqlite_loop if kind == "sqlite" else pg_loop
        loop(url, max(5, count // 50), seconds)  # warm-up: caches, prepared statements
        m = loop(url, count, seconds)
    what = (
        "raw `sqlite3` loop, WAL + synchronous=NORMAL, one commit per transition"
        if kind == "sqlite"
        else "raw `psycopg` loop, one connection, one commit per transition"
    )
    row = Row(
        what=f"{what} ({m.count:,} orders){m.note()}",
        value=f"{m.per_second:,.0f} orders/s",
        reference="itself",
        ratio="100%",
        limit=m.limit,
    )
    return row, m.per_second
