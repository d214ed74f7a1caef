"""Relays and writers racing on PostgreSQL (issue 19 item 2). SQLite admits one writer at a
time, so neither race can happen there.

- The auto-increment trap: a relay that followed a cursor over an auto-increment id would
  skip an event whose transaction took its id first but committed after a later one.
  Here two connections (what two processes are to the database) commit interleaved:
  the later-numbered event is delivered first, the earlier-numbered one still arrives.
- Two relays share one destination's work and never send one event at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from datetime import timedelta
from functools import partial
from typing import Any

import psycopg
import pytest

from downstream.seed import MISSING_PRODUCT_ID, ORDINARY_USER_ID
from fsm import outbox, outbox_sql, subscriptions
from fsm.destinations import transient
from fsm.executor import Executor
from fsm.models import Order
from fsm.relay import Relay, Sent
from fsm.store import Store, utcnow
from fsm.wiring import build_store
from tests.support.database import PG_SERVER, pg_admin
from tests.support.endpoint import Endpoint
from tests.support.events import (
    FAST_EVENTS,
    below_horizon,
    expected,
    label,
    orders,
    out_of_order,
    relaying,
    sink_seen,
    subscribe_sink,
)
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until, wait_until_async

POSTGRESQL_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


async def looked_up(store: Store, owner: str) -> Order:
    """An order whose next move (product_missing -> rejected) makes an event."""
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=MISSING_PRODUCT_ID, quantity=1, owner=owner
    )
    await store.record_transition(
        order=order, owner=owner, scope="order", trigger="request_product"
    )
    return order


def wait_on(event: threading.Event, _cursor: Any) -> None:
    """A committer op that holds its transaction open until `event` is set."""
    assert event.wait(30), "never released"


def position(store: Store, event_id: str) -> int:
    with store.engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT position FROM outbox_events WHERE id = %s", (event_id,)
        ).one()
    return int(row[0])


def transition_id(store: Store, order: Order) -> int:
    with store.engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT id FROM transitions WHERE order_id = %s AND seq = %s",
            (order.id, order.version),
        ).one()
    return int(row[0])


@POSTGRESQL_ONLY
async def test_an_event_committed_after_a_later_numbered_one_is_still_delivered(
    db_url: str, services_url: str
) -> None:
    first, second = (build_store(saga_settings(db_url)) for _ in range(2))
    try:
        subscribe_sink(first, services_url)
        x, y = await looked_up(first, "a"), await looked_up(second, "b")
        gate, reached, release = threading.Event(), threading.Event(), threading.Event()
        # Hold `first`'s writer in a transaction of its own, so that X's move and the
        # holder, queued meanwhile, share the next one.
        entered = threading.Event()

        def at_the_gate(cursor: Any) -> None:
            entered.set()
            wait_on(gate, cursor)

        opened = first.committer.submit(at_the_gate)
        assert await asyncio.to_thread(entered.wait, 30)
        x_move = asyncio.ensure_future(
            first.record_transition(order=x, owner="a", scope="order", trigger="product_missing")
        )
        while x.version != 2:  # applied in memory when queued: the move is in the queue
            await asyncio.sleep(0)

        def holder(cursor: Any) -> None:
            reached.set()  # X's rows are written (its ids taken), not committed
            wait_on(release, cursor)

        held = first.committer.submit(holder)
        gate.set()
        await opened
        assert await asyncio.to_thread(reached.wait, 30)
        await second.record_transition(order=y, owner="b", scope="order", trigger="product_missing")
        x_event, y_event = f"{x.id}:{x.version}", f"{y.id}:{y.version}"
        # Y is committed, X not, and X's event took the lower position: a cursor over the
        # position alone would take Y now and pass X's position for good. Below the
        # horizon, neither is readable yet (X's transaction is still running).
        (destination,) = subscriptions.destinations(second)
        now = utcnow()
        probe = await second.committer.submit(
            partial(
                outbox_sql.take_batch,
                second.dialect,
                destination_id=destination.id,
                owner="probe",
                now=now,
                lease_until=now,
                limit=100,
            )
        )
        assert probe is not None
        assert not {x_event, y_event} & {e.event_id for e in probe.events}
        async with relaying(second, saga_settings(db_url, **FAST_EVENTS)):

            def arrived(event_id: str) -> bool:
                return event_id in {e["id"] for e in sink_seen(services_url)["events"]}

            release.set()
            await held
            await x_move
            await wait_until_async(
                lambda: arrived(x_event) and arrived(y_event), what="X's event, committed later"
            )
        # The trap was armed: X's event (and transition) took the lower id, committed last.
        assert position(second, x_event) < position(second, y_event)
        assert transition_id(first, x) < transition_id(second, y)
    finally:
        for store in (first, second):
            store.close()
            store.engine.dispose()


@POSTGRESQL_ONLY
async def test_the_stream_follows_txid_then_position_below_the_horizon(store: Store) -> None:
    """Two connections: A's transaction takes its id first, B's inserts an event (lower
    position), A's inserts one (higher position) and commits first. The stream gives A's
    event now (its transaction is below the horizon, B's is not), then B's once B commits:
    in (txid, position) order B's comes after A's although its position is lower; a
    cursor over the position alone, at A's event, would skip B's for good."""
    subscriptions.add_webhook(store, "http://127.0.0.1:9/h", outbox.DEFAULT_TYPES)
    (destination,) = subscriptions.destinations(store)
    d = store.dialect

    def event(name: str) -> tuple[Any, ...]:
        order_id = uuid.uuid4()
        return (f"{order_id}:0", order_id, 0, "order.created", utcnow(), name)

    def take(cursor: Any) -> list[str]:
        now = utcnow()
        batch = outbox_sql.take_batch(
            d,
            cursor,
            destination_id=destination.id,
            owner="r",
            now=now,
            lease_until=now,
            limit=100,
        )
        assert batch is not None
        if batch.events:
            outbox_sql.advance(
                d, cursor, destination_id=destination.id, owner="r", batch=batch,
                lease_until=now,
            )  # fmt: skip
        return [e.body for e in batch.events]

    a, b = store.engine.raw_connection(), store.engine.raw_connection()
    try:
        ca, cb = a.cursor(), b.cursor()
        ca.execute("SELECT pg_current_xact_id()")  # A's transaction id: the lower one
        cb.execute(outbox_sql.insert_event(d), event("B"))
        ca.execute(outbox_sql.insert_event(d), event("A"))
        a.commit()
        # Polled: a transaction of another test on the same server (the horizon is the
        # cluster's) may hold A's event back a moment; the first non-empty take is exact.
        first = await wait_until_async(lambda: store.committer.submit(take), what="A's event")
        assert first == ["A"]  # B's transaction is running
        b.commit()
        with store.engine.connect() as conn:
            pa, pb = (
                conn.exec_driver_sql(
                    f"SELECT position FROM outbox_events WHERE body = '{n}'"
                ).scalar_one()
                for n in ("A", "B")
            )
        assert pb < pa  # a cursor over the position alone, at A's, has passed B's
        assert await wait_until_async(lambda: store.committer.submit(take), what="B's") == ["B"]
    finally:
        a.close()
        b.close()


@POSTGRESQL_ONLY
async def test_two_relays_never_send_one_event_at_once(
    db_url: str, store: Store, executor: Executor
) -> None:
    other = build_store(saga_settings(db_url))
    settings = saga_settings(db_url, **{**FAST_EVENTS, "relay_batch": 3})
    try:
        async with Endpoint(delay=0.05) as endpoint:
            subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
            async with relaying(store, settings), relaying(other, settings):
                ids = await orders(store, executor, 15)
                want = expected(store, ids, outbox.DEFAULT_TYPES)
                await wait_until_async(
                    lambda: len(endpoint.requests) >= len(want), what="every event"
                )
    finally:
        other.close()
        other.engine.dispose()
    assert endpoint.most_at_once == 1
    assert sorted(e["id"] for e in endpoint.events()) == sorted(want)  # none twice
    assert out_of_order(endpoint.events()) == []


@POSTGRESQL_ONLY
async def test_the_idle_probe_is_an_index_range_scan_on_a_fresh_database(store: Store) -> None:
    """The pump's look for events after its cursor (every `relay_interval` per destination)
    reads the (txid, position) index from the cursor on, stopping at the first: no
    sequential scan computing the horizon per row, even before the table has statistics."""
    d = store.dialect

    def write(cursor: Any) -> None:
        for n in range(3000):
            order_id = uuid.uuid4()
            cursor.execute(
                outbox_sql.insert_event(d),
                (f"{order_id}:0", order_id, 0, "order.created", utcnow(), str(n)),
            )

    await store.committer.submit(write)
    with store.engine.connect() as conn:
        plan = "\n".join(
            r[0]
            for r in conn.exec_driver_sql(
                "EXPLAIN " + outbox_sql.any_after(d).replace("%s", "0")
            ).fetchall()
        )
    assert "ix_outbox_events_txid_position" in plan and "Seq Scan" not in plan, plan


@POSTGRESQL_ONLY
async def test_events_held_by_a_transaction_open_in_another_database_name_it_then_go(
    db_url: str,
    store: Store,
    executor: Executor,
    services_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The horizon is the server's: a transaction left open in another database (here the
    tests' admin database, with a transaction id) holds every event back. The relay warns,
    naming that session's pid and database; once it commits, the events go and the relay
    says the horizon moved on."""
    caplog.set_level(logging.INFO, logger="order_saga.relay")
    subscribe_sink(store, services_url)
    with pg_admin() as elsewhere:
        elsewhere.execute("BEGIN")
        elsewhere.execute("SELECT pg_current_xact_id()")
        (pid,) = elsewhere.execute("SELECT pg_backend_pid()").fetchone() or (None,)
        (database,) = elsewhere.execute("SELECT current_database()").fetchone() or (None,)

        def said(level: int, words: str) -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == level and words in r.getMessage()
            ]

        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
            ids = await orders(store, executor, 3)
            want = expected(store, ids, outbox.DEFAULT_TYPES)
            (warning, *_) = await wait_until_async(
                lambda: said(logging.WARNING, f"pid {pid} (database {database},"),
                30,
                what="the warning naming the open transaction",
            )
            assert "query" not in warning and "SELECT" not in warning
            assert sink_seen(services_url)["events"] == []  # held back meanwhile
            # Undelivered all the same: counted, and their age shown as the lag (/metrics,
            # /healthz), while they wait.
            pending, lag, _dead = subscriptions.lags(store)[label(store, f"{services_url}/sink")]
            assert pending == len(want) and lag > 0
            elsewhere.execute("COMMIT")
            await wait_until_async(
                lambda: len(sink_seen(services_url)["events"]) >= len(want), what="the sink"
            )
            await wait_until_async(
                lambda: said(logging.INFO, "horizon moved on"), what="the all-clear"
            )
    assert sorted(e["id"] for e in sink_seen(services_url)["events"]) == sorted(want)


@POSTGRESQL_ONLY
def test_another_role_s_holder_is_named_by_pid_and_database_its_state_hidden(
    store: Store,
) -> None:
    """To a role without pg_read_all_stats, another role's session shows its pid, user,
    database and transaction ids, not its state or start: the lookup still names it (and
    not a bystander whose snapshot merely sees that transaction, nor itself)."""
    role = f"horizon_{uuid.uuid4().hex[:8]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        try:
            with pg_admin() as elsewhere, pg_admin() as bystander:
                elsewhere.execute("BEGIN")
                row = elsewhere.execute(
                    "SELECT pg_current_xact_id()::text::bigint, pg_backend_pid()"
                ).fetchone()
                assert row is not None
                xid, pid = row
                bystander.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                bystander.execute("SELECT 1")  # a snapshot at that xid, no xid of its own
                dsn = PG_SERVER.replace("postgresql+psycopg://postgres@", f"postgresql://{role}@")
                with psycopg.connect(f"{dsn}/test", autocommit=True) as unprivileged:
                    holder = _holder_of(store, unprivileged, xid)
                elsewhere.execute("ROLLBACK")
                bystander.execute("ROLLBACK")
            assert (holder.pid, holder.database, holder.user, holder.by_xid) == (
                pid,
                "test",
                "postgres",
                True,
            )
            assert (holder.state, holder.open_seconds) == (None, None)
        finally:
            admin.execute(f'DROP ROLE "{role}"')


def _holder_of(store: Store, conn: psycopg.Connection[Any], xid: int) -> outbox_sql.Holder:
    """The horizon's holder once `xid` is the horizon (older transactions of parallel tests
    on the server have ended)."""
    found: list[outbox_sql.Holder] = []

    def at_xid() -> bool:
        found.append(outbox_sql.horizon_holder(store.dialect, conn.cursor()))
        return found[-1].xid == xid

    wait_until(at_xid, 30, what=f"xid {xid} to be the horizon")
    return found[-1]


@POSTGRESQL_ONLY
async def test_a_removal_racing_a_settle_leaves_no_rows_of_the_removed_destination(
    db_url: str, store: Store
) -> None:
    """`webhooks remove` while a relay records a batch: the relay's transaction has moved
    the cursor and written an exception row (a failed event), not committed; the removal
    waits for it (the cursor's row lock), then deletes that row with the destination. No
    row of a removed destination is left pending (retention would keep its order for
    good)."""
    subscriptions.add_webhook(store, "http://127.0.0.1:9/h", outbox.DEFAULT_TYPES)
    (destination,) = subscriptions.destinations(store)
    d = store.dialect

    def write(cursor: Any) -> None:
        order_id = uuid.uuid4()
        cursor.execute(
            outbox_sql.insert_event(d),
            (f"{order_id}:0", order_id, 0, "order.created", utcnow(), "{}"),
        )

    await store.committer.submit(write)
    await below_horizon(store)
    now = utcnow()
    lease = now + timedelta(seconds=30)
    batch = await store.committer.submit(
        partial(
            outbox_sql.take_batch,
            d,
            destination_id=destination.id,
            owner="r",
            now=now,
            lease_until=lease,
            limit=10,
        )  # fmt: skip
    )
    assert batch is not None and len(batch.events) == 1
    sent = Sent([], utcnow(), batch=batch, stream=[(batch.events[0], transient("HTTP 500"))])
    relay = Relay(store, saga_settings(db_url, **FAST_EVENTS))
    settling, removing = store.engine.raw_connection(), store.engine.raw_connection()
    try:
        cursor = settling.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        (settler,) = cursor.fetchone()
        assert relay._settle(destination, "r", sent, cursor, lease) == batch.last
        removed: list[bool] = []

        def remove() -> None:
            removed.append(
                outbox_sql.remove_destination(d, removing.cursor(), destination_id=destination.id)
            )
            removing.commit()

        thread = threading.Thread(target=remove)
        thread.start()

        def blocked() -> bool:
            with store.engine.connect() as conn:
                return bool(
                    conn.exec_driver_sql(
                        "SELECT 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                        (settler,),
                    ).first()
                )

        await wait_until_async(blocked, what="the removal to wait for the settle")
        settling.commit()
        await asyncio.to_thread(thread.join, 30)
        assert removed == [True]
    finally:
        settling.close()
        removing.close()
    with store.engine.connect() as conn:
        left = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM outbox_deliveries WHERE destination_id = %s", (destination.id,)
        ).scalar_one()
    assert left == 0
