"""The database side of the tests: PostgreSQL databases made per worker, waiting out
leases, and reads of the saga's own tables (leases, history, open
transactions)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from sqlmodel import SQLModel

from fsm import queries
from fsm.store import Store, utcnow
from tests.support.waiting import past, wait_until

PG_SERVER = os.environ.get("ORDER_SAGA_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


def pg_admin() -> psycopg.Connection[Any]:
    """An autocommit connection to the server's `test` database (not a test's own)."""
    dsn = PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + "/test"
    return psycopg.connect(dsn, autocommit=True)


def create_pg_database(name: str) -> str:
    with pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_pg_database(name: str) -> None:
    with pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def pg_database_with(**defaults: str) -> Iterator[str]:
    """A scratch PostgreSQL database, schema made, whose sessions default to `defaults`
    (`ALTER DATABASE … SET timezone = 'Asia/Kolkata'`, as an operator's server, database
    or role may), dropped on the way out. The server's own settings are never changed."""
    from fsm.store import make_engine

    name = f"order_saga_defaults_{uuid.uuid4().hex[:12]}"
    url = create_pg_database(name)
    try:
        with pg_admin() as admin:
            for key, value in defaults.items():
                admin.execute(
                    sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                        sql.Identifier(name), sql.Identifier(key), sql.Literal(value)
                    )
                )
        engine = make_engine(url)
        SQLModel.metadata.create_all(engine)
        engine.dispose()
        yield url
    finally:
        drop_pg_database(name)


def wait_for_lease_expiry(store: Store, order_id: uuid.UUID, *, limit: float = 30.0) -> None:
    """A SIGKILLed driver cannot release its lease: wait until it has run out."""
    expires = store.get(order_id).lease_expires_at
    if expires is None:
        return
    remaining = (expires - utcnow()).total_seconds()
    assert remaining < limit, f"lease of {order_id} runs {remaining:.1f}s more"
    wait_until(past(expires, utcnow), limit, what=f"the lease of {order_id} to run out")


def wait_for_leases_to_expire(store: Store, *, limit: float = 30.0) -> None:
    """Every lease the store holds has run out (the drivers that held them were killed)."""

    def all_expired() -> bool:
        now = utcnow()
        return all(
            o.lease_expires_at is None or o.lease_expires_at < now
            for o in queries.list_orders(store, queries.OrderFilter(limit=10_000)).orders
        )

    wait_until(all_expired, limit, what="every lease to run out")


def stuck_orders(
    store: Store, n: int, *, user_id: int, product_id: int, quantity: int
) -> list[uuid.UUID]:
    """`n` pending, unleased orders: what a crashed API process leaves behind."""

    async def create() -> list[uuid.UUID]:
        made = [
            await store.create_order(user_id=user_id, product_id=product_id, quantity=quantity)
            for _ in range(n)
        ]
        return [order.id for order, _ in made]

    return asyncio.run(create())


def triggers_by_scope(store: Store, order_id: uuid.UUID) -> dict[str, Counter[str]]:
    found: dict[str, Counter[str]] = {}
    for t in store.history(order_id):
        found.setdefault(t.scope, Counter())[t.trigger] += 1
    return found


def in_transaction_elsewhere(database_url: str) -> bool:
    """Does another connection hold an open transaction (a write lock) right now?"""
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=0)
        try:
            conn.execute("BEGIN IMMEDIATE")  # WAL: fails only while someone writes
        except sqlite3.OperationalError:
            return True
        finally:
            conn.close()
        return False
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as pg:
        row = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND state <> 'idle'"
        ).fetchone()
    return bool(row and row[0])


def corrupt_state(database_url: str, order_id: uuid.UUID, state: str = "warp_drive") -> None:
    """Write a state no machine declares into an order's row, as a botched migration or a
    hand edit would: the row the views must show as unreadable, never take down."""
    from sqlalchemy import text

    from fsm.store import make_engine

    engine = make_engine(database_url)
    key = order_id.hex if engine.dialect.name == "sqlite" else str(order_id)
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET state = :s WHERE id = :id"), {"s": state, "id": key})
    engine.dispose()
