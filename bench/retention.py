"""Retention (issue 22): database bytes per completed order (SQLite and PostgreSQL), the
time to prune 100,000 terminal orders, and the HTTP p99 of concurrent orders while a prune
runs against the same run without one (PostgreSQL).

Bytes per order: real orders driven by the engine with the fake services, the database's
growth divided by their number (SQLite: the file after a WAL checkpoint; PostgreSQL: both
tables with their indexes and TOAST). The 100,000 orders to prune are copies of one real
completed order and its ten transitions, COPied in (PostgreSQL) as created and finished
three days ago. On PostgreSQL twice: once alone on their day, whose partition the prune
drops whole, and once with one order of that day that must stay, so the prune deletes
row by row in batches (fsm.partitions).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, select, text
from sqlmodel import SQLModel

from bench import engine_api
from bench.common import (
    Config,
    Row,
    saga_argv,
    saga_env,
    scratch_database,
    serving,
)
from bench.engine import drive
from bench.fakes import fake_services
from bench.http_load import load
from fsm import partitions
from fsm.migrate import upgrade


def _size(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                return Path(url.removeprefix("sqlite:///")).stat().st_size
            query = (  # the log's partitions too (a partitioned parent has no storage)
                "SELECT pg_total_relation_size('orders') + "
                "coalesce((SELECT sum(pg_total_relation_size(relid)) "
                "FROM pg_partition_tree('transitions')), pg_total_relation_size('transitions'))"
            )
            return int(conn.execute(text(query)).scalar_one())
    finally:
        engine.dispose()


async def _orders(url: str, count: int) -> None:
    async with engine_api.open_engine(url, fake_services()) as engine:
        await drive(engine, count, 16, 600.0)


def bytes_per_order(url: str, count: int) -> float:
    asyncio.run(_orders(url, 20))  # the first pages and the statistics, not counted
    before = _size(url)
    asyncio.run(_orders(url, count))
    return (_size(url) - before) / count


def copy_terminal_orders(url: str, count: int, *, day: date, hold_one: bool = False) -> None:
    """`count` copies of the newest completed order with its transitions, created (and
    finished) on `day`; with `hold_one`, one more order that must stay (not terminal) on
    the same day, so that PostgreSQL cannot drop the day's partition and prunes row by
    row. PostgreSQL: COPY; SQLite: executemany, 1,000 orders a transaction."""
    tables = SQLModel.metadata.tables
    orders, transitions = tables["orders"], tables["transitions"]
    engine = create_engine(url)
    then = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    try:
        with engine.connect() as conn:
            template = conn.execute(
                select(orders).where(orders.c.state == "completed").limit(1)
            ).one()
            lines = conn.execute(
                select(transitions).where(transitions.c.order_id == template.id)
            ).all()
            if conn.dialect.name == "postgresql":
                partitions.ensure(conn, first=day, last=day)
        order_row = {**template._mapping, "created_at": then, "updated_at": then}
        order_row["idempotency_key"] = None
        line_rows = [{**r._mapping, "created_at": then, "order_created_at": then} for r in lines]
        for line in line_rows:
            line.pop("id", None)  # numbered by the database
        held = {**order_row, "id": uuid.uuid4(), "state": "pending", "status": "pending"}
        if url.startswith("postgresql"):
            _copy(
                engine, orders, transitions, order_row, line_rows, count, held if hold_one else None
            )
            return
        for start in range(0, count, 1000):
            batch_orders: list[dict[str, Any]] = []
            batch_lines: list[dict[str, Any]] = []
            for _ in range(min(1000, count - start)):
                oid = uuid.uuid4()
                batch_orders.append({**order_row, "id": oid})
                batch_lines += [{**line, "order_id": oid} for line in line_rows]
            with engine.begin() as conn:
                conn.execute(orders.insert(), batch_orders)
                conn.execute(transitions.insert(), batch_lines)
        if hold_one:
            with engine.begin() as conn:
                conn.execute(orders.insert(), [held])
    finally:
        engine.dispose()


def _copy(
    engine: Engine,
    orders: Table,
    transitions: Table,
    order_row: dict[str, Any],
    line_rows: list[dict[str, Any]],
    count: int,
    held: dict[str, Any] | None,
) -> None:
    """COPY the orders and their transitions in (PostgreSQL, psycopg)."""
    order_cols = [c.name for c in orders.columns]
    line_cols = [c.name for c in transitions.columns if c.name != "id"]

    def value(v: Any) -> Any:
        return json.dumps(v) if isinstance(v, dict) else v

    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        with cursor.copy(f"COPY orders ({', '.join(order_cols)}) FROM STDIN") as copy:
            ids = [uuid.uuid4() for _ in range(count)]
            for oid in ids:
                copy.write_row([value({**order_row, "id": oid}[c]) for c in order_cols])
            if held is not None:
                copy.write_row([value(held[c]) for c in order_cols])
        names = ", ".join(f'"{c}"' for c in line_cols)
        with cursor.copy(f"COPY transitions ({names}) FROM STDIN") as copy:
            for oid in ids:
                for line in line_rows:
                    copy.write_row([value({**line, "order_id": oid}[c]) for c in line_cols])
        raw.commit()
    finally:
        raw.close()


def prune_time(cfg: Config, kind: str, count: int, *, hold_one: bool = False) -> tuple[int, float]:
    with scratch_database(cfg, kind, "prune") as url:
        upgrade(url)
        asyncio.run(_orders(url, 5))
        copy_terminal_orders(url, count, day=_three_days_ago(), hold_one=hold_one)
        return engine_api.prune(url, older_than=600)


def _three_days_ago() -> date:
    return (datetime.now(UTC) - timedelta(days=3)).date()


def p99_with_and_without_prune(
    cfg: Config, count: int, seconds: float, *, hold_one: bool
) -> tuple[str, str, str, float]:
    """PostgreSQL: 8 clients for `seconds`, without then with `order-saga prune` of `count`
    orders running in its own process. (p99 without, p99 with, how the prune went, ratio)."""

    def backlog(url: str, _services_url: str) -> None:
        upgrade(url)
        asyncio.run(_orders(url, 5))
        copy_terminal_orders(url, count, day=_three_days_ago(), hold_one=hold_one)

    with serving(cfg, "postgresql", "pruneload", prepare=backlog) as up:
        procs, base, env = up.procs, up.base, saga_env(up.url, up.services_url)
        asyncio.run(load(base, 2, 2.0))  # warm-up
        without = asyncio.run(load(base, 8, seconds))
        began = time.monotonic()
        pruning = procs.start("prune", saga_argv("prune", "--older-than", "600"), env)
        with_prune = asyncio.run(load(base, 8, seconds))
        during = pruning.poll() is None
        code = pruning.wait(timeout=900)
        took = time.monotonic() - began
        if code != 0:
            raise RuntimeError(f"prune exited {code}: {procs.log_tail(pruning)}")
        note = f"prune took {took:.0f}s" + (
            ", ran through the whole load" if during else ", ended before the load did"
        )
        p_without, p_with = without.percentile(99), with_prune.percentile(99)
        return (
            f"p99 {p_without} ms ({len(without.latencies):,} orders)",
            f"p99 {p_with} ms ({len(with_prune.latencies):,} orders)",
            note,
            float(p_with) / float(p_without) if p_without else 0.0,
        )


_MODES = {
    False: "all of one past day: PostgreSQL drops its partition",
    True: "one order of that day must stay: row by row",
}


def run(cfg: Config) -> list[Row]:
    rows = []
    count = cfg.n(100_000, 5_000)
    for kind in cfg.databases():
        with scratch_database(cfg, kind, "bytes") as url:
            upgrade(url)
            n = cfg.n(2_000, 200)
            rows.append(
                Row(
                    what=f"database bytes per completed order, {kind} ({n:,} orders, 10 "
                    "transitions each)",
                    value=f"{bytes_per_order(url, n):,.0f} bytes",
                    target="levels off with retention on",
                )
            )
        for hold_one in (False, True) if kind == "postgresql" else (False,):
            deleted, seconds = prune_time(cfg, kind, count, hold_one=hold_one)
            how = _MODES[hold_one] if kind == "postgresql" else "batches of 200"
            rows.append(
                Row(
                    what=f"`prune` of {count:,} terminal orders with their transitions, {kind}"
                    f" ({how})",
                    value=f"{seconds:.1f} s ({deleted / seconds:,.0f} orders/s)"
                    if seconds
                    else "-",
                    limit="batches of 200, one short transaction each"
                    if hold_one or kind == "sqlite"
                    else "one transaction: the day's orders deleted, its partition dropped",
                )
            )
    if cfg.pg_server:
        for hold_one in (False, True):
            without, with_prune, note, ratio = p99_with_and_without_prune(
                cfg, count, cfg.seconds(20, 5), hold_one=hold_one
            )
            rows.append(
                Row(
                    what=f"`POST /orders`, 8 clients, postgresql, while `prune` deletes {count:,}"
                    f" ({_MODES[hold_one]})",
                    value=f"{with_prune}: {ratio:.2f}× the p99 without",
                    reference=f"same run without a prune: {without}",
                    target="≤ 1.5× the p99 without",
                    limit=note,
                )
            )
    return rows
