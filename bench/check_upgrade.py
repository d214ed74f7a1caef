"""How long `order-saga check-upgrade` takes over many live orders (issue 10). Prints
figures; asserts nothing.

Fills a fresh database with `--live` non-terminal orders spread over the live states and
step states (plus `--terminal` finished ones, which the check's query filters out), with
one bulk INSERT, then times `fsm.upgrade.check` against the installed machine (passes) and
against a machine that renames `needs_attention` (strands those orders and lists their ids).

Usage: python bench/check_upgrade.py [--live 100000] [--terminal 100000] [--pg URL | --no-pg]
       [--cli]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Engine, insert
from sqlmodel import SQLModel

import fsm.models  # noqa: F401
from fsm.machine import coarse_status
from fsm.models import OrderTable
from fsm.store import make_engine
from fsm.upgrade import Tables, check
from fsm.version import MACHINE_VERSION

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
ORDER_SAGA = os.path.join(os.path.dirname(sys.executable), "order-saga")
LIVE = [  # (state, payment, inventory, shipping): where live orders sit
    ("pending", "pending", "pending", "pending"),
    ("product_requested", "pending", "pending", "pending"),
    ("steps_running", "requested", "requested", "requested"),
    ("steps_running", "succeeded", "requested", "succeeded"),
    ("steps_running", "failed", "succeeded", "requested"),
    ("compensating", "compensating", "failed", "succeeded"),
    ("needs_attention", "compensating", "failed", "compensated"),
    ("cancelling", "compensated", "compensating", "compensating"),
]
DONE = [
    ("completed", "succeeded", "succeeded", "succeeded"),
    ("failed", "failed", "compensated", "compensated"),
]


def rows(combos: list[tuple[str, str, str, str]], n: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    out = []
    for _, (state, pay, inv, ship) in zip(range(n), itertools.cycle(combos), strict=False):
        out.append(
            {
                "id": uuid.uuid4(),
                "user_id": 1,
                "product_id": 1,
                "quantity": 1,
                "amount": 1999,
                "state": state,
                "status": coarse_status(state).value,
                "payment_state": pay,
                "inventory_state": inv,
                "shipping_state": ship,
                "version": 5,
                "attempts": {},
                "cancel_requested": state == "cancelling",
                "created_at": now,
                "updated_at": now,
                "machine_version": MACHINE_VERSION,
            }
        )
    return out


def fill(engine: Engine, live: int, terminal: int) -> float:
    SQLModel.metadata.drop_all(engine)
    SQLModel.metadata.create_all(engine)
    start = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(insert(OrderTable.__table__), rows(LIVE, live) + rows(DONE, terminal))  # type: ignore[attr-defined]
    return time.perf_counter() - start


def timed(engine: Engine, tables: Tables | None, ids: int) -> tuple[float, str]:
    best, line = float("inf"), ""
    for _ in range(3):
        start = time.perf_counter()
        report = check(engine, tables, with_ids=ids)
        best = min(best, time.perf_counter() - start)
        line = f"{report.summary()} [{report.groups} groups]"
    return best, line


def bench(name: str, engine: Engine, args: argparse.Namespace) -> None:
    took = fill(engine, args.live, args.terminal)
    print(f"{name}: inserted {args.live} live + {args.terminal} terminal orders in {took:.1f}s")
    seconds, line = timed(engine, None, 1000)
    print(f"{name}: check-upgrade, installed machine: {seconds * 1000:.0f} ms -> {line}")
    renamed = Tables.installed().renamed("order", "needs_attention", "parked")
    seconds, line = timed(engine, renamed, 100_000)
    print(f"{name}: check-upgrade, needs_attention renamed (ids listed): {seconds * 1000:.0f} ms")
    print(f"    -> {line}")
    if args.cli:  # the whole command: process start, imports, query, printing
        env = {**os.environ, "ORDER_SAGA_DATABASE_URL": engine.url.render_as_string(False)}
        start = time.perf_counter()
        done = subprocess.run([ORDER_SAGA, "check-upgrade"], env=env, capture_output=True)
        took = time.perf_counter() - start
        print(f"{name}: `order-saga check-upgrade` (exit {done.returncode}): {took:.2f} s")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=100_000)
    parser.add_argument("--terminal", type=int, default=100_000)
    parser.add_argument("--pg", default=PG)
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--cli", action="store_true", help="also time the console command")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench("SQLite", make_engine(f"sqlite:///{tmp}/check.db"), args)
    if not args.no_pg:
        name = "order_saga_bench_check_upgrade"
        with psycopg.connect(args.pg.replace("+psycopg", "") + "/test", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            bench("PostgreSQL", make_engine(f"{args.pg}/{name}"), args)
        finally:
            with psycopg.connect(args.pg.replace("+psycopg", "") + "/test", autocommit=True) as a:
                a.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
