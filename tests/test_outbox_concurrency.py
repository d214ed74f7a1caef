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
import threading
from typing import Any

import pytest

from downstream.seed import MISSING_PRODUCT_ID, ORDINARY_USER_ID
from fsm import outbox, subscriptions
from fsm.executor import Executor
from fsm.models import Order
from fsm.store import Store
from fsm.wiring import build_store
from tests.support.endpoint import Endpoint
from tests.support.events import (
    FAST_EVENTS,
    expected,
    orders,
    out_of_order,
    relaying,
    sink_seen,
    subscribe_sink,
)
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until_async

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
        async with relaying(second, saga_settings(db_url, **FAST_EVENTS)):
            await second.record_transition(
                order=y, owner="b", scope="order", trigger="product_missing"
            )

            def arrived(order: Order) -> bool:
                ids = {e["id"] for e in sink_seen(services_url)["events"]}
                return f"{order.id}:{order.version}" in ids

            await wait_until_async(lambda: arrived(y), what="Y's event")
            assert not arrived(x)
            release.set()
            await held
            await x_move
            await wait_until_async(lambda: arrived(x), what="X's event, committed later")
        # The trap was armed: X's transition took the lower id and committed last.
        assert transition_id(first, x) < transition_id(second, y)
    finally:
        for store in (first, second):
            store.close()
            store.engine.dispose()


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
