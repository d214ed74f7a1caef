"""Group commit and a write path off the event loop (issue 8), on SQLite and PostgreSQL:
concurrent orders share transactions and still end right; one bad write in a batch fails
alone; while a write waits on a lock, reads still answer, and the wait is bounded."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest
from sqlmodel import SQLModel

from api.app import create_app
from downstream.seed import (
    ORDINARY_USER_ID,
    POOR_USER_ID,
    RICH_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from fsm.errors import StaleOrder, StoreUnavailable
from fsm.executor import Executor
from fsm.models import Order
from fsm.store import Store, make_engine
from fsm.wiring import build_store, open_store
from tests.support.database import pg_database_with
from tests.support.services import Books, Downstream, LiveServer, assert_conserved
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until_async

# (user, product, status) — each row's expected outcome, from the seed's named roles.
MIX = [
    (RICH_USER_ID, WIDGET_ID, "completed"),  # SPEC §1 row 1
    (POOR_USER_ID, WIDGET_ID, "failed"),  # row 3: payment fails, the rest undone
    (ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID, "failed"),  # row 4: inventory fails
]


async def test_concurrent_orders_share_commits_and_all_end_right(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    plan = MIX * 10
    books = Books.read(downstream, users=[u for u, _, _ in plan], products=[p for _, p, _ in plan])

    async def one(user: int, product: int) -> Order:
        order, _ = await store.create_order(
            user_id=user, product_id=product, quantity=1, owner=executor.owner
        )
        return await executor.drive(order)

    orders = await asyncio.gather(*(one(u, p) for u, p, _ in plan))

    assert [o.status for o in orders] == [status for _, _, status in plan]
    assert store.committer.largest_batch > 1, "no two writes ever shared a commit"
    assert store.committer.ops > store.committer.batches
    persisted = [store.get(o.id) for o in orders]
    assert [(o.status, o.version) for o in persisted] == [(o.status, o.version) for o in orders]
    for o in persisted:  # every committed version has its log line, in order
        assert [t.seq for t in store.history(o.id)] == list(range(1, o.version + 1))
        assert o.lease_owner is None
    assert_conserved(downstream, books, persisted)


@contextmanager
def write_lock_held(db_url: str, order: Order) -> Iterator[None]:
    """Another session holds a lock the next write of `order` must wait for: SQLite's
    write lock (BEGIN IMMEDIATE), PostgreSQL's row lock (SELECT ... FOR UPDATE)."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1 FROM orders WHERE id = %s FOR UPDATE", [order.id])
        yield
        conn.rollback()


async def new_orders(store: Store, count: int) -> list[Order]:
    return [
        (
            await store.create_order(
                user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner="t"
            )
        )[0]
        for _ in range(count)
    ]


def request_product(store: Store, order: Order) -> Awaitable[str]:
    return store.record_transition(order=order, owner="t", scope="order", trigger="request_product")


async def one_batch(store: Store, writes: Callable[[], list[Awaitable[Any]]]) -> list[Any]:
    """Queue `writes` while the writer thread is held busy (an op that waits on a gate), so
    they go in together as the next batch; their results or exceptions. (Not a row lock:
    on PostgreSQL a write that meets one leaves the batch for the side lane.)"""
    gate = threading.Event()
    first = store.committer.submit(lambda cursor: gate.wait(10))
    try:
        await wait_until_async(lambda: store.committer.in_flight == 1, what="the writer")
        batched = asyncio.gather(*writes(), return_exceptions=True)
        await asyncio.sleep(0)  # let them be queued behind the held transaction
    finally:
        gate.set()
    await first
    return await batched


async def test_a_stale_write_inside_a_batch_fails_alone(db_url: str, store: Store) -> None:
    good_a, good_b, stale = await new_orders(store, 3)
    old_copy = store.get(stale.id)
    await request_product(store, stale)

    results = await one_batch(
        store,
        lambda: [
            request_product(store, good_a),
            request_product(store, old_copy),  # version 0: the row is at 1
            request_product(store, good_b),
        ],
    )

    assert store.committer.largest_batch == 3  # the three shared one transaction
    assert results[0] == results[2] == "product_requested"
    assert isinstance(results[1], StaleOrder)
    assert [store.get(o.id).version for o in (good_a, stale, good_b)] == [1, 1, 1]
    assert [t.trigger for t in store.history(stale.id)] == ["request_product"]


async def test_a_statement_the_database_rejects_inside_a_batch_fails_alone(
    db_url: str, store: Store
) -> None:
    """On PostgreSQL a batch's statements are sent together (pipeline mode), so the error
    cannot say whose statement it was: the batch is run again one statement at a time,
    and only the culprit fails."""
    good_a, good_b = await new_orders(store, 2)

    def rejected(cursor: Any) -> Generator[None, None, None]:  # an order without its columns
        cursor.execute(store.dialect.sql("INSERT INTO orders (id) VALUES (%s)"), [uuid4().hex])
        yield

    results = await one_batch(
        store,
        lambda: [
            request_product(store, good_a),
            store.committer.submit(rejected),
            request_product(store, good_b),
        ],
    )

    assert store.committer.largest_batch == 2  # the good two committed together, without it
    assert results[0] == results[2] == "product_requested"
    assert isinstance(results[1], sqlite3.IntegrityError | psycopg.IntegrityError)
    for order in (good_a, good_b):
        assert store.get(order.id).state == "product_requested"
        assert [t.trigger for t in store.history(order.id)] == ["request_product"]


class LosesTheAnswer:
    """A PostgreSQL connection whose commit, once `lose()` says so, is done on the server and
    then the link drops before the client hears it (pg_terminate_backend): all the
    committer learns is that its connection broke during the commit."""

    def __init__(self, conn: psycopg.Connection[Any], dsn: str, lose: Callable[[], bool]):
        self._conn, self._dsn, self._lose = conn, dsn, lose
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def commit(self) -> None:
        self._conn.commit()
        if self._lose():
            self.lost += 1
            with psycopg.connect(self._dsn, autocommit=True) as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", [self._conn.info.backend_pid])
            self._conn.execute("SELECT 1")  # raises: the server is gone
            raise AssertionError("the terminated connection still answered")


def lose_the_answer(store: Store, pg_url: str, *, batch: int) -> list[LosesTheAnswer]:
    """From now on the committer's connections lose the answer to the first commit of a
    batch of `batch` writes; the list fills with those connections (one per connect)."""
    committer = store.committer
    connections: list[LosesTheAnswer] = []
    real = committer.backend.connect
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")

    def lossy() -> LosesTheAnswer:
        lose = lambda: committer.in_flight == batch and not any(c.lost for c in connections)  # noqa: E731
        connections.append(LosesTheAnswer(real(), dsn, lose))
        return connections[-1]

    committer.close()  # its next writer connects through `lossy`
    committer.backend = dataclasses.replace(committer.backend, connect=lossy)
    return connections


async def test_a_batch_whose_commit_answer_was_lost_is_not_refused_as_stale(
    pg_url: str,
) -> None:
    """The batch committed on the server, the connection dropped before the answer came;
    the committer reconnects and runs the batch again, and each write, meeting the
    version it moved itself, took it for another writer's: StaleOrder for every order of
    the batch (their runs aborted, ~30 s lost waiting for the sweep, an operator's
    action reported failed though it was done). Now each finds its own line in the log."""
    with open_store(saga_settings(pg_url, lease_seconds=30)) as store:
        orders = await new_orders(store, 3)
        connections = lose_the_answer(store, pg_url, batch=3)

        results = await one_batch(store, lambda: [request_product(store, o) for o in orders])

        assert sum(c.lost for c in connections) == 1  # the batch's commit, and only it
        assert results == ["product_requested"] * 3
        for order in orders:
            assert store.get(order.id).version == 1  # written once, not twice
            assert [t.trigger for t in store.history(order.id)] == ["request_product"]
        # Their drivers go on from there: the copies they hold are at version 1 too.
        await store.record_audit(order=orders[0], owner="t", action="resume", detail={})
        assert store.get(orders[0].id).version == 2


async def test_two_writes_of_one_order_in_a_batch_whose_answer_was_lost_both_count(
    pg_url: str,
) -> None:
    """Steps write side by side, so one batch can hold two writes of one order, the second
    built on the first. Retried after the lost answer, the first finds the order already
    past its own version (the second moved it on): still its own write, its line in the
    log at its seq, the lease still its driver's."""
    with open_store(saga_settings(pg_url, lease_seconds=30)) as store:
        [order] = await new_orders(store, 1)
        connections = lose_the_answer(store, pg_url, batch=2)
        results = await one_batch(
            store,
            lambda: [
                request_product(store, order),
                store.record_audit(order=order, owner="t", action="resume", detail={}),
            ],
        )
        assert sum(c.lost for c in connections) == 1
        assert results == ["product_requested", None]
        assert store.get(order.id).version == 2
        assert [t.trigger for t in store.history(order.id)] == ["request_product", "resume"]


@pytest.fixture
def live_api(db_url: str, services_url: str) -> Iterator[tuple[str, Store]]:
    settings = saga_settings(db_url, services_url, db_lock_timeout=1.5)
    app = create_app(settings, sweep=False)
    with LiveServer(app, lifespan="on") as server:
        yield server.url, app.state.store


async def test_reads_answer_while_a_write_waits_on_a_lock(
    db_url: str, live_api: tuple[str, Store]
) -> None:
    url, store = live_api
    order, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        with write_lock_held(db_url, order):
            resume = asyncio.ensure_future(client.post(f"/orders/{order.id}/resume"))
            await wait_until_async(
                lambda: store.committer.in_flight > 0, what="a write waiting on the lock"
            )
            health = await client.get("/healthz")
            got = await client.get(f"/orders/{order.id}")
            # Both answered while the write was still waiting: nothing froze the loop.
            assert not resume.done()
        assert (health.status_code, got.status_code) == (200, 200)
        assert got.json()["status"] == "pending"
        answer = await resume
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "completed"


async def test_a_lock_held_past_the_timeout_is_a_clear_503(
    db_url: str, live_api: tuple[str, Store]
) -> None:
    url, store = live_api
    order, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        with write_lock_held(db_url, order):
            answer = await client.post(f"/orders/{order.id}/resume")  # waits 1.5 s, no more
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"]
        assert "database" in answer.json()["detail"]
        # Nothing was lost or half-written: the order is as it was, and can go on now.
        assert (await client.get(f"/orders/{order.id}")).json()["state"] == "pending"
        again = await client.post(f"/orders/{order.id}/resume")
    assert again.json()["status"] == "completed"


async def test_a_write_queued_behind_a_blocked_one_waits_one_lock_timeout_not_two(
    tmp_path: Any,
) -> None:
    """SQLite: a write submitted while the writer waits in vain on another process's write
    lock fails `DB_LOCK_TIMEOUT` after it was submitted, not after that wait *and* a full
    timeout of its own (the documented 5 s were ~10 s). Bounds generous: the old path took
    2x the timeout for the second write, the new one 1x."""
    url = f"sqlite:///{tmp_path}/saga.db"
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    timeout = 2.0
    store = build_store(saga_settings(url, db_lock_timeout=timeout))
    try:
        first_order, second_order = await new_orders(store, 2)

        async def timed(order: Order) -> tuple[BaseException | str, float]:
            started = time.monotonic()
            try:
                outcome: BaseException | str = await request_product(store, order)
            except StoreUnavailable as exc:
                outcome = exc
            return outcome, time.monotonic() - started

        with write_lock_held(url, first_order):
            first = asyncio.ensure_future(timed(first_order))
            await wait_until_async(lambda: store.committer.in_flight == 1, what="the writer")
            second = await timed(second_order)  # queued behind it
            assert store.committer.last_error is not None  # what /healthz reports
            print(f"second write failed after {second[1]:.2f}s (lock timeout {timeout}s)")
        assert isinstance((await first)[0], StoreUnavailable)
        assert isinstance(second[0], StoreUnavailable), second
        assert "locked" in str(second[0])
        assert second[1] < 1.5 * timeout, f"waited {second[1]:.1f}s for a {timeout}s timeout"
        # The lock is gone: the next write commits, and the error is cleared.
        assert await request_product(store, second_order) == "product_requested"
        assert store.committer.last_error is None
    finally:
        store.close()
        store.engine.dispose()


async def test_a_small_batch_waits_for_the_orders_in_flight_but_a_lone_order_never_waits(
    store: Store,
) -> None:
    """`serve --workers N`: each process has fewer writes queued per commit, so a batch
    holding fewer than half of the orders the process drives waits (up to the linger) for
    theirs; a process driving one order never waits. (The linger is long here so that what
    waited shows, not how long by luck.)"""
    a, b, c, d = await new_orders(store, 4)
    committer = store.committer
    committer.linger = 5.0
    committer.company = {a.id}  # one order in flight: nobody to wait for
    began = time.monotonic()
    await request_product(store, a)
    assert time.monotonic() - began < 2.5
    assert committer.lingered == 0

    committer.company = {a.id, b.id, c.id, d.id}
    batches = committer.batches
    began = time.monotonic()
    first = asyncio.ensure_future(request_product(store, b))
    await wait_until_async(lambda: committer.lingered == 1, what="the writer to linger")
    await asyncio.sleep(0.2)
    assert not first.done(), "a quarter of the orders in flight: it waits for company"
    await request_product(store, c)  # half of them now: the batch goes
    assert await first == "product_requested"
    assert committer.batches == batches + 1, "the two writes shared one commit"
    assert time.monotonic() - began < 2.5
    assert store.get(b.id).state == store.get(c.id).state == "product_requested"


async def test_a_lingering_batch_is_committed_when_the_store_closes(
    db_url: str, store: Store
) -> None:
    (order,) = await new_orders(store, 1)
    committer = store.committer
    committer.linger = 30.0
    committer.company = {order.id, uuid4(), uuid4()}
    write = asyncio.ensure_future(request_product(store, order))
    await wait_until_async(lambda: committer.lingered == 1, what="the writer to linger")
    began = time.monotonic()
    store.close()  # commits what is queued, the lingering batch included, and stops
    assert time.monotonic() - began < 10
    assert await write == "product_requested"
    assert store.get(order.id).state == "product_requested"


def test_writes_racing_a_close_are_all_committed_and_the_close_returns(
    db_url: str, store: Store
) -> None:
    """Closing the store while other threads keep writing (a shutdown with work still in
    flight, a store used again): each close stops its writer and returns, and every write
    commits, queued for a running writer or starting the next one. Before, a write that
    came between a close and its stop started a second writer on the same queue: either
    could take the stop, the other ran on, and the close waited for it for ever."""
    committer = store.committer
    stop = threading.Event()
    committed = [0] * 4

    def writer(n: int) -> None:
        while not stop.is_set():
            committer.call(lambda conn: None)
            committed[n] += 1

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(200):
            closing = threading.Thread(target=committer.close, daemon=True)
            closing.start()
            closing.join(timeout=10)
            assert not closing.is_alive(), "a close waits for a writer that never stops"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads), "a write was never committed"
    assert all(committed)


def isolation(dbapi_conn: Any) -> str:
    """The isolation a new transaction of this connection runs at."""
    row = dbapi_conn.execute("SHOW transaction_isolation").fetchone()
    dbapi_conn.rollback()
    return str(row[0])


def test_writes_run_at_read_committed_whatever_the_servers_default() -> None:
    """The guarded writes are designed for read committed: with `serializable` as the
    database's default, their conflicts failed with 40001 (StoreUnavailable, not retried:
    3 runs in 40 of two processes driving the same orders)."""
    with (
        pg_database_with(default_transaction_isolation="serializable") as url,
        open_store(saga_settings(url)) as store,
    ):
        with store.engine.connect() as conn:  # the read pool
            reads = isolation(conn.connection.driver_connection)
        commits = store.committer.call(
            lambda cursor: cursor.execute("SHOW transaction_isolation").fetchone()[0]
        )
        assert store.committer.backend.side is not None
        side = store.committer.backend.side.connect()  # the side lane (a locked row)
        try:
            locked_rows = isolation(side)
        finally:
            side.close()
    assert reads == commits == locked_rows == "read committed"
