"""The transactional outbox (issue 19 items 1-2): one CloudEvent per order status change,
written in the commit of its transition; each destination receives the types it subscribed
to, through its own cursor over the events. Both databases."""

from __future__ import annotations

import uuid
from datetime import timedelta
from functools import partial
from typing import Any

import pytest

from api.schemas import OrderOut
from downstream.seed import MISSING_PRODUCT_ID, ORDINARY_USER_ID, POOR_USER_ID, WIDGET_ID
from fsm import outbox, outbox_sql, subscriptions
from fsm.destinations import DELIVERED, transient
from fsm.errors import StaleOrder
from fsm.executor import Executor
from fsm.machine import coarse_status
from fsm.relay import Relay, Sent
from fsm.store import Store, utcnow
from tests.support.events import FAST_EVENTS, below_horizon, events_of, orders, subscribe_sink
from tests.support.settings import saga_settings

ROWS = [  # user, product -> the event types of the order, in order
    pytest.param(ORDINARY_USER_ID, WIDGET_ID, ["order.created", "order.completed"], id="completed"),
    pytest.param(
        POOR_USER_ID,
        WIDGET_ID,
        ["order.created", "order.compensating", "order.failed"],
        id="failed",
    ),
    pytest.param(
        ORDINARY_USER_ID, MISSING_PRODUCT_ID, ["order.created", "order.rejected"], id="rejected"
    ),
]


async def run(store: Store, executor: Executor, user: int, product: int) -> uuid.UUID:
    order, _ = await store.create_order(
        user_id=user, product_id=product, quantity=1, owner=executor.owner
    )
    await executor.drive(order)
    return order.id


@pytest.mark.parametrize(("user", "product", "types"), ROWS)
async def test_each_status_change_leaves_one_event_named_by_its_transition(
    user: int, product: int, types: list[str], store: Store, executor: Executor
) -> None:
    order_id = await run(store, executor, user, product)
    events = events_of(store, order_id)
    assert [e["type"] for e in events] == types
    # One per status change of the log, each named <order_id>:<seq of that transition>.
    changes, status = [0], coarse_status("pending")
    for t in store.history(order_id):
        if t.scope == "order" and coarse_status(t.to_state) != status:
            status = coarse_status(t.to_state)
            if outbox.event_type(None, status) is not None:
                changes.append(t.seq)
    assert [e["id"] for e in events] == [f"{order_id}:{seq}" for seq in changes]
    for event in events:
        assert event["specversion"] == "1.0"
        assert event["subject"] == str(order_id)
        assert event["source"] == "/order-saga"
        assert event["datacontenttype"] == "application/json"
        assert event["time"] == event["data"]["updated_at"]
    # The last event carries the order exactly as GET /orders/{id} shows it now.
    assert events[-1]["data"] == OrderOut.of(store.get(order_id)).model_dump(
        mode="json", exclude={"why"}
    )


async def test_a_refused_write_leaves_no_event(store: Store) -> None:
    order, _ = await store.create_order(user_id=1, product_id=1, quantity=1, owner="me")
    await store.record_transition(order=order, owner="me", scope="order", trigger="request_product")
    stale = store.get(order.id)
    stale.version -= 1  # another driver's view: the guarded write must refuse, event and all
    with pytest.raises(StaleOrder):
        await store.record_transition(
            order=stale, owner="me", scope="order", trigger="product_missing"
        )
    assert [e["type"] for e in events_of(store, order.id)] == ["order.created"]


async def test_deliveries_follow_each_destination_s_subscription(
    store: Store, executor: Executor
) -> None:
    default = subscriptions.add_webhook(store, "http://127.0.0.1:9/a", outbox.DEFAULT_TYPES)
    everything = subscriptions.add_webhook(store, "http://127.0.0.1:9/b", outbox.ALL_TYPES)
    only_failed = subscriptions.add_webhook(store, "http://127.0.0.1:9/c", ("order.failed",))
    order_id = await run(store, executor, POOR_USER_ID, WIDGET_ID)
    rows = subscriptions.deliveries(store, limit=100, order_id=order_id)
    got: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: r.event_id):
        got.setdefault(row.destination, []).append(row.type)
    assert {k: sorted(v) for k, v in got.items()} == {
        default.destination.name: ["order.created", "order.failed"],
        everything.destination.name: ["order.compensating", "order.created", "order.failed"],
        only_failed.destination.name: ["order.failed"],
    }
    assert {r.state for r in rows} == {"pending"}


def test_the_event_types_are_a_table_over_the_statuses() -> None:
    # Every terminal or operator-visible status has its type; `running` has none.
    assert outbox.event_type("pending", "running") is None
    assert outbox.event_type("running", "running") is None
    assert set(outbox.DEFAULT_TYPES) == {
        "order.created",
        "order.completed",
        "order.failed",
        "order.rejected",
        "order.cancelled",
        "order.needs_attention",
        "order.resolved",
    }
    assert outbox.OPT_IN == {"order.compensating"}
    with pytest.raises(ValueError, match="unknown event type"):
        outbox.parse_types(["order.shipped"])


async def test_a_batch_is_at_most_its_limit_and_one_relay_holds_the_cursor(
    store: Store, executor: Executor, services_url: str
) -> None:
    """A relay takes `relay_batch` events of the stream at a time, never more, and holds
    the destination's cursor meanwhile: another relay gets nothing of it; the holder, not
    having moved the cursor (killed before it could), reads the same batch again: what a
    kill costs in duplicates is one batch."""
    subscribe_sink(store, services_url)
    ids = await orders(store, executor, 6)  # 12+ events after the cursor (every type)
    await below_horizon(store)
    every = {e["id"] for i in ids for e in events_of(store, i)}
    (destination,) = subscriptions.destinations(store)

    def take(owner: str) -> Any:
        now = utcnow()
        return partial(
            outbox_sql.take_batch,
            store.dialect,
            destination_id=destination.id,
            owner=owner,
            now=now,
            lease_until=now + timedelta(seconds=30),
            limit=5,
        )

    first = await store.committer.submit(take("a"))
    assert first is not None and len(first.events) == 5
    assert await store.committer.submit(take("b")) is None  # the cursor is a's
    again = await store.committer.submit(take("a"))
    assert again is not None and [e.event_id for e in again.events] == [
        e.event_id for e in first.events
    ]
    advance = partial(
        outbox_sql.advance,
        store.dialect,
        destination_id=destination.id,
        owner="b",
        batch=first,
        lease_until=None,
    )
    assert await store.committer.submit(advance) is False  # b does not hold it
    assert await store.committer.submit(partial(advance, owner="a")) is True  # and let go
    taken = [e.event_id for e in first.events]
    while (batch := await store.committer.submit(take("b"))) is not None and batch.events:
        assert len(batch.events) <= 5
        taken += [e.event_id for e in batch.events]
        await store.committer.submit(partial(advance, owner="b", batch=batch))
    assert len(taken) == len(set(taken)) and set(taken) == every  # once each, in order
    by_order: dict[str, list[int]] = {}
    for event_id in taken:
        order, seq = outbox_sql.split_id(event_id)
        by_order.setdefault(str(order), []).append(seq)
    assert all(seqs == sorted(seqs) for seqs in by_order.values()), by_order


async def test_an_exception_claim_leases_at_most_its_batch(
    store: Store, executor: Executor, services_url: str
) -> None:
    """The exception rows (failed once, or held) are claimed `relay_batch` at a time, never
    more, each the first undelivered one of its order. On PostgreSQL a LIMITed SKIP LOCKED
    subquery inside `IN (...)` may be run again per row and lease many more; the
    candidates are picked once."""
    subscribe_sink(store, services_url)
    ids = await orders(store, executor, 12)
    await below_horizon(store)
    (destination,) = subscriptions.destinations(store)
    now = utcnow()
    batch = await store.committer.submit(
        partial(
            outbox_sql.take_batch,
            store.dialect,
            destination_id=destination.id,
            owner="a",
            now=now,
            lease_until=now,
            limit=100,
        )
    )
    assert batch is not None and {e.order_id for e in batch.events} == set(ids)
    # Every event set aside as failed once: 12 orders, 12 first events claimable at once.
    rows = [outbox_sql.Aside(e, "pending", 1, now, "500") for e in batch.events]
    await store.committer.submit(
        partial(outbox_sql.set_aside, store.dialect, destination_id=destination.id, rows=rows)
    )
    taken: list[int] = []
    for owner in ("a", "b", "c", "d", "e"):
        now = utcnow()
        claim = partial(
            outbox_sql.claim,
            store.dialect,
            destination_id=destination.id,
            owner=owner,
            now=now,
            lease_until=now + timedelta(seconds=30),
            limit=3,
        )
        taken.append(len(await store.committer.submit(claim)))
    assert taken == [3, 3, 3, 3, 0]


async def test_a_held_event_is_set_aside_pending_when_its_dead_letter_was_redelivered(
    db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    """A batch taken while an order's first event was dead holds its later one; the
    operator redelivers the dead one before the batch is recorded: the held event is
    recorded pending (sent after it), not dead behind a dead letter that is gone."""
    subscribe_sink(store, services_url)
    (order_id,) = await orders(store, executor, 1)
    await below_horizon(store)
    (destination,) = subscriptions.destinations(store)
    relay = Relay(store, saga_settings(db_url, **FAST_EVENTS))
    owner = "r"
    now = utcnow()
    take = partial(
        outbox_sql.take_batch,
        store.dialect,
        destination_id=destination.id,
        owner=owner,
        now=now,
        lease_until=now + timedelta(seconds=30),
        limit=1,
    )
    first = await store.committer.submit(take)
    assert first is not None and [e.event_id for e in first.events] == [f"{order_id}:0"]
    dead = [outbox_sql.Aside(first.events[0], "dead", 1, now, "refused")]

    def record_dead(cursor: Any) -> None:
        outbox_sql.set_aside(store.dialect, cursor, destination_id=destination.id, rows=dead)
        assert outbox_sql.advance(
            store.dialect, cursor, destination_id=destination.id, owner=owner,
            batch=first, lease_until=now + timedelta(seconds=30),
        )  # fmt: skip

    await store.committer.submit(record_dead)
    second = await store.committer.submit(take)
    assert second is not None and second.held == {order_id: "dead"}
    (later,) = second.events
    assert (
        await store.committer.submit(
            partial(outbox_sql.redeliver, store.dialect, event_id=first.events[0].event_id, now=now)
        )
        == (1, 0)  # one delivery back in line, from the order's seq 0
    )
    sent = Sent([], utcnow(), batch=second, stream=[(later, None)])
    await store.committer.submit(partial(relay._settle, destination, owner, sent, lease_until=None))
    with store.engine.connect() as conn:
        states = dict(
            conn.exec_driver_sql("SELECT event_id, state FROM outbox_deliveries").fetchall()
        )
    assert states == {first.events[0].event_id: "pending", later.event_id: "pending"}


async def test_a_batch_of_ten_thousand_events_is_set_aside(store: Store) -> None:
    """`relay_batch` may be 10,000: that many exception rows (10 parameters each) are
    written, though one statement binds at most 32,766 (SQLite) or 65,535 (PostgreSQL)."""
    subscriptions.add_webhook(store, "http://127.0.0.1:9/h", outbox.DEFAULT_TYPES)
    (destination,) = subscriptions.destinations(store)
    now = utcnow()
    rows = [
        outbox_sql.Aside(
            outbox_sql.Claimed(f"{o}:0", o, 0, 0, now, now, "order.created", "{}"),
            "pending",
            1,
            now,
            "500",
        )  # fmt: skip
        for o in (uuid.uuid4() for _ in range(10_000))
    ]
    await store.committer.submit(
        partial(outbox_sql.set_aside, store.dialect, destination_id=destination.id, rows=rows)
    )
    with store.engine.connect() as conn:
        count = conn.exec_driver_sql("SELECT COUNT(*) FROM outbox_deliveries").scalar_one()
    assert count == 10_000


async def test_a_relay_commit_lost_with_the_server_never_lets_the_cursor_skip_a_batch(
    db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    """The relay's commits do not wait for the disk (fsm.wiring.relay_store). The one that
    recorded batch 1 (an event failed, its order's next held behind it) and took batch 2
    is lost with the server, after batch 2 was sent: the cursor is back before batch 1,
    with this relay's lease on it, and batch 1's exception rows are gone. Recording batch
    2 then must not move the cursor past batch 1: batch 1 is sent again, not skipped."""
    subscribe_sink(store, services_url)
    await orders(store, executor, 2)
    await below_horizon(store)
    (destination,) = subscriptions.destinations(store)
    relay = Relay(store, saga_settings(db_url, **{**FAST_EVENTS, "relay_batch": 2}))
    owner, now = "r", utcnow()
    lease = now + timedelta(seconds=30)
    take = partial(
        outbox_sql.take_batch,
        store.dialect,
        destination_id=destination.id,
        owner=owner,
        now=now,
        lease_until=lease,
        limit=2,
    )
    one = await store.committer.submit(take)
    assert one is not None and len(one.events) == 2
    failed = one.events[0]
    sent_one = Sent(
        [],
        utcnow(),
        batch=one,
        stream=[(failed, transient("HTTP 500"))]
        + [(e, None if e.order_id == failed.order_id else DELIVERED) for e in one.events[1:]],
    )
    work = outbox_sql.Work(stream=True, due=[], dead=False)
    two, _claimed = await store.committer.submit(
        partial(relay._settle_then, destination, owner, sent_one, work, now)
    )
    assert two is not None and len(two.events) == 2 and two.start == one.last

    with store.engine.begin() as conn:  # that commit lost: as the server comes back
        conn.exec_driver_sql("DELETE FROM outbox_deliveries")
        conn.exec_driver_sql(
            store.dialect.sql("UPDATE outbox_cursors SET txid = %s, position = %s"), one.start
        )
    sent_two = Sent([], utcnow(), batch=two, stream=[(e, DELIVERED) for e in two.events])
    at = await store.committer.submit(
        partial(relay._settle, destination, owner, sent_two, lease_until=lease)
    )
    assert at is None  # not recorded: the batch is sent again
    again = await store.committer.submit(take)
    assert again is not None
    assert [e.event_id for e in again.events] == [e.event_id for e in one.events]


async def test_a_late_refusal_never_dead_letters_a_row_another_relay_delivered(
    store: Store, executor: Executor, services_url: str
) -> None:
    """Relay A's claim runs out mid-send; B claims the row again and delivers it. A's
    refusal, recorded after, changes nothing: the row stays delivered and the order's later
    event is not marked dead behind it (as `retry_later`, `dead_letter` asks the owner)."""
    subscribe_sink(store, services_url)
    (order_id,) = await orders(store, executor, 1)
    await below_horizon(store)
    (destination,) = subscriptions.destinations(store)
    d, now = store.dialect, utcnow()
    batch = await store.committer.submit(
        partial(
            outbox_sql.take_batch,
            d,
            destination_id=destination.id,
            owner="r",
            now=now,
            lease_until=now,
            limit=100,
        )  # fmt: skip
    )
    assert batch is not None and len(batch.events) >= 2
    rows = [outbox_sql.Aside(e, "pending", 1, now, "500") for e in batch.events]
    await store.committer.submit(
        partial(outbox_sql.set_aside, d, destination_id=destination.id, rows=rows)
    )

    async def claim(owner: str, at: Any) -> list[outbox_sql.Claimed]:
        return await store.committer.submit(
            partial(
                outbox_sql.claim,
                d,
                destination_id=destination.id,
                owner=owner,
                now=at,
                lease_until=at + timedelta(seconds=1),
                limit=1,
            )  # fmt: skip
        )

    (by_a,) = await claim("a", now)
    (by_b,) = await claim("b", now + timedelta(seconds=2))  # A's lease ran out
    assert by_a.event_id == by_b.event_id == f"{order_id}:0"
    delivered = [by_b.event_id]
    await store.committer.submit(
        partial(
            outbox_sql.delivered,
            d,
            destination_id=destination.id,
            event_ids=delivered,
            now=utcnow(),
        )
    )
    late = partial(
        outbox_sql.dead_letter, d, destination_id=destination.id, claimed=by_a, owner="a",
        error="HTTP 410",
    )  # fmt: skip
    assert await store.committer.submit(late) is False
    with store.engine.connect() as conn:
        states = dict(
            conn.exec_driver_sql("SELECT event_id, state FROM outbox_deliveries").fetchall()
        )
    assert states[by_b.event_id] == "delivered"
    assert set(states.values()) == {"delivered", "pending"}  # none dead
