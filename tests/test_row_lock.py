"""Issue 16: a row lock costs only its own order (PostgreSQL; SQLite has no row locks). A
session holds one in-flight order's row `FOR UPDATE` past the lock timeout while other
orders run: their writes never wait for it (no op of theirs leaves the batch for the side
lane, where waiting for a row happens), their leases are renewed on time (a short lease,
calls that outlast it), and they all complete; the locked order's own write fails with a
clear `database busy` and, once the lock is gone, a resume completes it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import psycopg
import pytest
from sqlalchemy import text

from downstream.seed import RICH_USER_ID, WIDGET_ID
from fsm.clients import Services
from fsm.errors import StoreUnavailable
from fsm.executor import Executor
from fsm.models import Order
from fsm.store import Store
from fsm.wiring import build_executor, build_store
from tests.support.services import Books, Downstream, Fault, assert_conserved, set_faults
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until_async

LOCK_TIMEOUT = 2.0  # DB_LOCK_TIMEOUT here; the row is held 1.5x as long
LEASE = 1.5  # seconds: the other orders' calls take longer, so renewals must get through
OTHERS = 16


@pytest.fixture
async def engine_on_pg(pg_url: str, services: Services) -> AsyncIterator[tuple[Store, Executor]]:
    settings = saga_settings(
        pg_url, db_lock_timeout=LOCK_TIMEOUT, lease_seconds=LEASE, http_timeout=10.0
    )
    store = build_store(settings)
    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE transitions, orders"))
    executor = build_executor(settings, store=store, services=services)
    yield store, executor
    await executor.aclose()
    store.close()
    store.engine.dispose()


def hold_row(pg_url: str, order: Order, seconds: float, taken: threading.Event) -> None:
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1 FROM orders WHERE id = %s FOR UPDATE", [order.id])
        taken.set()
        threading.Event().wait(seconds)
        conn.rollback()


async def test_a_locked_row_costs_only_its_own_order(
    pg_url: str, engine_on_pg: tuple[Store, Executor], downstream: Downstream
) -> None:
    store, executor = engine_on_pg
    books = Books.read(downstream, users=[RICH_USER_ID], products=[WIDGET_ID])

    async def new() -> Order:
        order, _ = await store.create_order(
            user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
        )
        return order

    victim = await new()
    others = [await new() for _ in range(OTHERS)]
    # Every other order's payment takes 2 s at the service: longer than its lease.
    set_faults(downstream.url, [Fault("user.deduct", "delay", count=OTHERS, seconds=2.0)])

    taken = threading.Event()
    holder = threading.Thread(target=hold_row, args=(pg_url, victim, LOCK_TIMEOUT * 1.5, taken))
    holder.start()
    try:
        await asyncio.to_thread(taken.wait, 10)
        stuck = asyncio.ensure_future(executor.drive(victim))  # its first write meets the lock
        await wait_until_async(lambda: victim.id in store.committer.moved, what="the side lane")
        runs = await asyncio.gather(*(executor.drive(o) for o in others), return_exceptions=True)
        failure = await asyncio.gather(stuck, return_exceptions=True)
    finally:
        await asyncio.to_thread(holder.join)

    # The others: all completed, no lease lost, none of their writes ever left the batch.
    assert [getattr(r, "status", r) for r in runs] == ["completed"] * OTHERS
    assert set(store.committer.moved) == {victim.id}, store.committer.moved
    # The locked order: its own write waited its own timeout and failed clearly.
    assert isinstance(failure[0], StoreUnavailable) and "busy" in str(failure[0]), failure
    assert store.get(victim.id).state == "pending"
    # The lock is gone: it goes on like any stuck order.
    assert (await executor.run(victim.id)).status == "completed"
    assert_conserved(downstream, books, [store.get(o.id) for o in [victim, *others]])
