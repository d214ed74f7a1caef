"""The operator's engine-side pieces, on SQLite and PostgreSQL: `resolve` (the declared
needs_attention -> resolved edge), the read-only queries behind /ui and `orders list`
(filters, parked first, counts with zeros, time in each state, the heatmap), the orders
gauge counted at scrape time, and the one log line per transition."""

from __future__ import annotations

import logging
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from downstream.seed import (
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from fsm import metrics, operator, queries
from fsm.errors import InvalidMove, LeaseLost, OrderNotFound
from fsm.executor import Executor
from fsm.models import Order
from fsm.store import Store
from tests.support.services import Downstream


async def place(executor: Executor, store: Store, user: int, product: int, qty: int = 1) -> Order:
    order, _ = await store.create_order(user_id=user, product_id=product, quantity=qty)
    return await executor.run(order.id)


async def parked(executor: Executor, store: Store, downstream: Downstream) -> Order:
    """Row 4 (sold out) with the refund down past the retry budget: needs_attention."""
    downstream.fault("user.refund", "error", count=1000)
    order = await place(executor, store, ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID)
    httpx_delete_faults(downstream)
    assert order.state == "needs_attention", order
    return order


def httpx_delete_faults(downstream: Downstream) -> None:
    import httpx

    httpx.delete(f"{downstream.url}/_faults").raise_for_status()


def orders_gauge(store: Store) -> dict[str, float]:
    text = metrics.exposition(store.count_by_status).decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "order_saga_orders")
    return {s.labels["status"]: s.value for s in family.samples}


# -- resolve -----------------------------------------------------------------------------


async def test_resolve_ends_a_parked_order_with_the_reason_in_the_log(
    executor: Executor, store: Store, downstream: Downstream
) -> None:
    order = await parked(executor, store, downstream)
    reason_before = order.attention_reason
    resolved = await operator.resolve(
        store, order.id, reason=" refunded by hand ", owner="ops", operator="alice"
    )
    done = resolved.order
    assert not resolved.already
    assert (done.state, done.status, done.lease_owner) == ("resolved", "resolved", None)
    stored = store.get(order.id)
    assert (stored.state, stored.status, stored.lease_owner) == ("resolved", "resolved", None)
    assert stored.attention_reason is None and stored.next_attempt_at is None
    last = store.history(order.id)[-1]
    assert (last.trigger, last.from_state, last.to_state) == (
        "resolve",
        "needs_attention",
        "resolved",
    )
    assert last.detail == {"reason": "refunded by hand", "operator": "alice", "was": reason_before}
    # Terminal: a later resume changes nothing, and the sweep never picks it up again.
    again = await executor.run(order.id)
    assert again.version == stored.version
    # Resolving it again (another reason or not) is idempotent: nothing written.
    log = store.history(order.id)
    twice = await operator.resolve(store, order.id, reason="again", owner="ops")
    assert twice.already and (twice.order.state, twice.order.lease_owner) == ("resolved", None)
    assert store.history(order.id) == log and store.get(order.id).lease_owner is None


async def test_resolve_refuses_what_is_not_parked(
    executor: Executor, store: Store, downstream: Downstream
) -> None:
    completed = await place(executor, store, ORDINARY_USER_ID, WIDGET_ID)
    with pytest.raises(InvalidMove, match="only a parked"):
        await operator.resolve(store, completed.id, reason="x", owner="ops")
    assert store.get(completed.id).lease_owner is None  # released on refusal
    with pytest.raises(OrderNotFound):
        await operator.resolve(store, uuid.uuid4(), reason="x", owner="ops")
    order = await parked(executor, store, downstream)
    with pytest.raises(ValueError, match="reason"):
        await operator.resolve(store, order.id, reason="  ", owner="ops")
    assert await store.claim(order_id=order.id, owner="a-driver") is not None  # someone drives it
    with pytest.raises(LeaseLost):
        await operator.resolve(store, order.id, reason="x", owner="ops")
    assert store.get(order.id).state == "needs_attention"


# -- queries -----------------------------------------------------------------------------


async def test_list_filters_pages_and_puts_parked_first(
    executor: Executor, store: Store, downstream: Downstream
) -> None:
    completed = await place(executor, store, ORDINARY_USER_ID, WIDGET_ID)
    order = await parked(executor, store, downstream)
    failed = await place(executor, store, POOR_USER_ID, WIDGET_ID)
    rejected = await place(executor, store, ORDINARY_USER_ID, MISSING_PRODUCT_ID)
    listed = queries.list_orders(store, queries.OrderFilter(parked_first=True))  # the console's
    everything, total = listed.orders, listed.total
    assert total == 4 and everything[0].id == order.id  # parked first, though not newest
    assert listed.next_cursor is None  # its pages go by offset
    assert [o.id for o in everything[1:]] == [rejected.id, failed.id, completed.id]

    def ids(**kw: object) -> list[uuid.UUID]:
        return [o.id for o in queries.list_orders(store, queries.OrderFilter(**kw)).items]  # type: ignore[arg-type]

    assert ids(status="failed") == [failed.id]
    assert ids(state="rejected") == [rejected.id]
    assert ids(user_id=POOR_USER_ID) == [failed.id]
    assert ids(product_id=SOLD_OUT_PRODUCT_ID) == [order.id]
    assert ids(older_than=3600) == []
    assert ids(older_than=0, status="completed") == [completed.id]
    page = queries.list_orders(store, queries.OrderFilter(limit=2, offset=2, parked_first=True))
    assert page.total == 4 and [o.id for o in page.items] == [failed.id, completed.id]
    assert ids(id_prefix=str(failed.id)[:8]) == [failed.id]  # the start of an id
    assert ids(id_prefix=str(failed.id).upper()) == [failed.id]  # or all of it
    with pytest.raises(ValueError, match="not the start of an order id"):
        ids(id_prefix="zz")


async def test_cursor_pages_see_every_order_once_while_orders_arrive(
    executor: Executor, store: Store, downstream: Downstream
) -> None:
    made = [await place(executor, store, ORDINARY_USER_ID, MISSING_PRODUCT_ID) for _ in range(5)]
    parked_one = await parked(executor, store, downstream)
    first = queries.list_orders(store, queries.OrderFilter(limit=4))
    assert first.total == 6 and first.items[0].id == parked_one.id and first.next_cursor
    newer = await place(executor, store, ORDINARY_USER_ID, MISSING_PRODUCT_ID)  # arrives now
    second = queries.list_orders(store, queries.OrderFilter(limit=4, cursor=first.next_cursor))
    assert second.next_cursor is None and second.total == 7
    seen = [o.id for o in first.items + second.items]
    assert seen == [parked_one.id, *[o.id for o in reversed(made)]]  # none twice, none lost
    assert newer.id not in seen  # newest first: a later order belongs before page one
    newest = queries.list_orders(store, queries.OrderFilter(limit=4))
    assert newest.items[0].id == newer.id
    with pytest.raises(queries.BadCursor):
        queries.list_orders(store, queries.OrderFilter(cursor="not-a-cursor"))
    with pytest.raises(queries.BadCursor, match="newest first"):  # offset pages only
        queries.list_orders(store, queries.OrderFilter(cursor=first.next_cursor, parked_first=True))
    counts = queries.counts_by_status(store)
    assert counts["needs_attention"] == 1 and counts["cancelled"] == 0 and counts["resolved"] == 0


async def test_timeline_gives_time_in_each_state(
    executor: Executor, store: Store, downstream: Downstream
) -> None:
    order = await place(executor, store, POOR_USER_ID, WIDGET_ID)
    history = store.history(order.id)
    spans = queries.timeline(history)
    assert [s.seq for s in spans] == [t.seq for t in history]
    by_seq = {t.seq: t for t in history}
    for span in spans:
        later = [t for t in history if t.scope == span.scope and t.seq > span.seq]
        if later:  # until the same scope's next transition
            expected = (later[0].created_at - by_seq[span.seq].created_at).total_seconds()
            assert span.seconds == pytest.approx(expected)
        else:
            assert span.seconds is None  # still there
    assert spans[-1].to_state == "failed" and spans[-1].seconds is None


async def test_heat_counts_passes_times_and_occupancy(
    executor: Executor, store: Store, downstream: Downstream
) -> None:
    for _ in range(3):
        await place(executor, store, ORDINARY_USER_ID, WIDGET_ID)
    failed = await place(executor, store, POOR_USER_ID, WIDGET_ID)
    heat = queries.heat(store)
    assert heat.states[("order", "completed")].now == 3
    assert heat.states[("order", "failed")].now == 1
    assert heat.states[("order", "steps_running")].entered == 4
    assert heat.states[("order", "steps_running")].now == 0
    running = heat.states[("order", "steps_running")]
    assert running.p50 is not None and running.p95 is not None and 0 <= running.p50 <= running.p95
    assert heat.states[("order", "completed")].p50 is None  # nobody ever left it
    assert heat.edges[("order", "all_succeeded", "steps_running", "completed")] == 3
    assert heat.edges[("payment", "fail", "requested", "failed")] == 1
    assert ("order", "cancel", "completed", "cancelling") not in heat.edges
    # p95 of steps_running is the slowest of the four stays (nearest rank): check it,
    spans = [
        s.seconds
        for o in queries.list_orders(store, queries.OrderFilter()).items
        for s in queries.timeline(store.history(o.id))
        if s.scope == "order" and s.to_state == "steps_running"
    ]
    slowest = max(s for s in spans if s is not None)
    # kept as log-scale buckets (40 a decade): the bucket's middle, within 2.9%
    assert running.p95 == queries.bucket_seconds(queries.bucket(slowest))
    assert running.p95 == pytest.approx(slowest, rel=0.029)
    assert failed.status == "failed"


# -- metrics and logs -------------------------------------------------------------------


async def test_orders_gauge_is_counted_at_scrape_time_and_drops_to_zero(
    executor: Executor, store: Store, downstream: Downstream
) -> None:
    order = await parked(executor, store, downstream)
    before = orders_gauge(store)
    assert before["needs_attention"] == 1 and before["resolved"] == 0 and before["pending"] == 0
    await operator.resolve(store, order.id, reason="fixed", owner="ops")
    after = orders_gauge(store)
    assert after["needs_attention"] == 0 and after["resolved"] == 1  # zero, not a stale 1
    text = metrics.exposition(store.count_by_status).decode()
    assert 'order_saga_call_seconds_count{action="deduct",service="user"}' in text
    assert "order_saga_run_seconds_count" in text


async def test_one_log_line_per_transition_with_order_state_and_trigger(
    executor: Executor, store: Store, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="order_saga.events")
    order = await parked(executor, store, downstream)
    await operator.resolve(store, order.id, reason="fixed", owner="ops")
    about = [r for r in caplog.records if getattr(r, "order_id", None) == str(order.id)]
    mine = [r for r in about if hasattr(r, "scope")]  # the transitions' lines
    history = store.history(order.id)
    assert [(r.scope, r.trigger, r.state) for r in mine] == [  # type: ignore[attr-defined]
        (t.scope, t.trigger, t.to_state) for t in history
    ]
    events = {r.trigger: r.event for r in mine}  # type: ignore[attr-defined]
    assert events["park"] == "parked" and events["resolve"] == "resolved"
    assert events["request_product"] == "transition"
    park = next(r for r in mine if r.trigger == "park")  # type: ignore[attr-defined]
    assert "payment refund did not succeed" in park.getMessage()  # the reason, greppable
    # every failed attempt of the refund is a line with the order's id, call and error
    failed = [r for r in about if getattr(r, "event", None) == "attempt_failed"]
    assert [r.call for r in failed] == ["payment:refund"] * 3  # type: ignore[attr-defined]
    assert all("500" in r.getMessage() for r in failed)


async def test_a_refused_write_is_logged_as_lease_lost(
    executor: Executor, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner="other"
    )
    caplog.set_level(logging.INFO, logger="order_saga.events")
    with pytest.raises(LeaseLost):
        await executor.drive(order)  # we never claimed it: the first write is refused
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "lease_lost"]
    assert (line.order_id, line.state, line.trigger) == (  # type: ignore[attr-defined]
        str(order.id),
        "pending",
        "request_product",
    )


async def test_heat_windows_counts_pending_and_tints_only_work(
    executor: Executor, store: Store, downstream: Downstream
) -> None:
    from datetime import timedelta

    from fsm.heatmap import HeatOverlay

    for _ in range(2):
        await place(executor, store, ORDINARY_USER_ID, WIDGET_ID)
    everything = queries.heat(store)
    assert everything.states[("order", "pending")].entered == 2  # created: entered pending
    later = queries.heat(store, since=queries.utcnow() + timedelta(seconds=1))
    assert later.states[("order", "pending")].entered == 0  # nothing in the window...
    assert ("order", "all_succeeded", "steps_running", "completed") not in later.edges
    assert later.states[("order", "completed")].now == 2  # ...but who sits where is now's
    # a completed order that waits an hour to be cancelled is not slow: never tinted
    heat = queries.Heat(
        states={
            ("order", "completed"): queries.StateHeat(1, 1, 3600.0, 3600.0),
            ("order", "steps_running"): queries.StateHeat(1, 0, 2.0, 2.0),
        }
    )
    overlay = HeatOverlay(heat)
    assert overlay.state("order", "completed")["fillcolor"] == "#ffffff"
    assert overlay.state("order", "steps_running")["fillcolor"] != "#ffffff"  # the slowest
