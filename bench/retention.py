"""Retention (issue 22): database bytes per completed order (SQLite and PostgreSQL), the
time to prune 100,000 terminal orders, and the HTTP p99 of concurrent orders while a prune
runs against the same run without one (PostgreSQL).

Bytes per order: real orders driven by the engine with the fake services, the database's
growth divided by their number (SQLite: the file after a WAL checkpoint; PostgreSQL: both
tables with their indexes and TOAST). The 100,000 orders to prune are copies of one real
completed order and its ten transitions, inserted in bulk and aged an hour.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text
from sqlmodel import SQLModel

from bench import engine_api
from bench.common import (
    Config,
    Processes,
    Row,
    free_port,
    saga_argv,
    saga_env,
    scratch_database,
    start_services,
    wait_http,
)
from bench.engine import drive
from bench.fakes import fake_services
from bench.http_load import load
from fsm.migrate import upgrade


def _size(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                return Path(url.removeprefix("sqlite:///")).stat().st_size
            query = (
                "SELECT pg_total_relation_size('orders') + pg_total_relation_size('transitions')"
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


def copy_terminal_orders(url: str, count: int, *, age: float = 3600.0) -> None:
    """`count` copies of the newest completed order with its transitions, `age` old."""
    tables = SQLModel.metadata.tables
    orders, transitions = tables["orders"], tables["transitions"]
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            template = conn.execute(
                select(orders).where(orders.c.state == "completed").limit(1)
            ).one()
            lines = conn.execute(
                select(transitions).where(transitions.c.order_id == template.id)
            ).all()
        then = datetime.now(UTC) - timedelta(seconds=age)
        order_row = {**template._mapping, "created_at": then, "updated_at": then}
        line_rows = [{**r._mapping, "created_at": then} for r in lines]
        for line in line_rows:
            line.pop("id", None)
        for start in range(0, count, 1000):
            batch_orders: list[dict[str, Any]] = []
            batch_lines: list[dict[str, Any]] = []
            for _ in range(min(1000, count - start)):
                oid = uuid.uuid4()
                batch_orders.append({**order_row, "id": oid, "idempotency_key": None})
                batch_lines += [{**line, "order_id": oid} for line in line_rows]
            with engine.begin() as conn:
                conn.execute(orders.insert(), batch_orders)
                conn.execute(transitions.insert(), batch_lines)
    finally:
        engine.dispose()


def prune_time(cfg: Config, kind: str, count: int) -> tuple[int, float]:
    with scratch_database(cfg, kind, "prune") as url:
        upgrade(url)
        asyncio.run(_orders(url, 5))
        copy_terminal_orders(url, count)
        return engine_api.prune(url, older_than=600)


def p99_with_and_without_prune(cfg: Config, count: int, seconds: float) -> tuple[str, str, str]:
    """PostgreSQL: 8 clients for `seconds`, without then with `order-saga prune` of `count`
    orders running in its own process. (p99 without, p99 with, how the prune went)."""
    with Processes(cfg) as procs, scratch_database(cfg, "postgresql", "pruneload") as url:
        upgrade(url)
        asyncio.run(_orders(url, 5))
        copy_terminal_orders(url, count)
        _, services_url = start_services(procs)
        port = free_port()
        env = saga_env(url, services_url)
        serve = procs.start("serve", saga_argv("serve", "--port", str(port), "--no-sweep"), env)
        base = f"http://127.0.0.1:{port}"
        wait_http(procs, serve, f"{base}/healthz")
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
        return (
            f"p99 {without.percentile(99)} ms ({len(without.latencies):,} orders)",
            f"p99 {with_prune.percentile(99)} ms ({len(with_prune.latencies):,} orders)",
            note,
        )


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
        deleted, seconds = prune_time(cfg, kind, count)
        rows.append(
            Row(
                what=f"`prune` of {count:,} terminal orders with their transitions, {kind}",
                value=f"{seconds:.1f} s ({deleted / seconds:,.0f} orders/s)" if seconds else "-",
                limit="batches of 200, one short transaction each",
            )
        )
    if cfg.pg_server:
        without, with_prune, note = p99_with_and_without_prune(cfg, count, cfg.seconds(20, 5))
        rows.append(
            Row(
                what=f"`POST /orders`, 8 clients, postgresql, while `prune` deletes {count:,}",
                value=with_prune,
                reference=f"same run without a prune: {without}",
                target="≤ 1.5× the p99 without",
                limit=note,
            )
        )
    return rows
