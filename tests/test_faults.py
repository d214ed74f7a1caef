"""SPEC §2 and §3 in-process: lost responses, transient errors, timeouts, outages longer
than the retry budget, stale writers and leases, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from downstream.seed import (
    MISSING_USER_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from fsm import queries
from fsm.clients import Services
from fsm.errors import InvalidMove, LeaseLost, StaleOrder
from fsm.executor import Executor
from fsm.retry import RetryPolicy
from fsm.store import Store, utcnow
from tests.support.services import Books, Downstream
from tests.support.services import assert_conserved as check_conserved
from tests.support.waiting import past, wait_until, wait_until_async

# (operation, user, product, quantity, final status): a row in which that call happens.
MUTATIONS = [
    pytest.param("user.deduct", ORDINARY_USER_ID, WIDGET_ID, 1, "completed", id="deduct"),
    pytest.param("inventory.deduct", ORDINARY_USER_ID, WIDGET_ID, 1, "completed", id="reserve"),
    pytest.param("shipping.schedule", ORDINARY_USER_ID, WIDGET_ID, 1, "completed", id="ship"),
    # inventory fails -> refund
    pytest.param("user.refund", ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID, 1, "failed", id="refund"),
    # payment fails -> restore inventory, cancel shipping
    pytest.param("inventory.restore", POOR_USER_ID, WIDGET_ID, 1, "failed", id="restore"),
    pytest.param("shipping.cancel", POOR_USER_ID, WIDGET_ID, 1, "failed", id="cancel-shipping"),
]


def assert_conserved(
    downstream: Downstream, store: Store, balances: dict[int, int], stocks: dict[int, int]
) -> None:
    """The one conservation check (tests/support/services.py) over every stored order."""
    check_conserved(
        downstream,
        Books(balances, stocks),
        queries.list_orders(store, queries.OrderFilter(limit=500)).orders,
    )


async def run_row(store: Store, executor: Executor, user: int, product: int, quantity: int) -> str:
    order, _ = await store.create_order(
        user_id=user, product_id=product, quantity=quantity, owner=executor.owner
    )
    await executor.drive(order)
    return store.get(order.id).status


@pytest.mark.parametrize(("operation", "user", "product", "quantity", "status"), MUTATIONS)
async def test_lost_response_applies_the_effect_once(
    operation: str,
    user: int,
    product: int,
    quantity: int,
    status: str,
    store: Store,
    executor: Executor,
    downstream: Downstream,
) -> None:
    balances, stocks = {user: downstream.balance(user)}, {product: downstream.stock(product)}
    downstream.fault(operation, "apply_then_error")
    assert await run_row(store, executor, user, product, quantity) == status
    assert_conserved(downstream, store, balances, stocks)
    order = queries.list_orders(store, queries.OrderFilter()).orders[0]
    step, _, action = operation.partition(".")
    call = f"{'payment' if step == 'user' else step}:{action}"
    assert order.attempts == {call: 1}  # one retry, persisted, same key


@pytest.mark.parametrize(("operation", "user", "product", "quantity", "status"), MUTATIONS)
async def test_transient_errors_are_retried_with_the_same_key(
    operation: str,
    user: int,
    product: int,
    quantity: int,
    status: str,
    store: Store,
    executor: Executor,
    downstream: Downstream,
) -> None:
    balances, stocks = {user: downstream.balance(user)}, {product: downstream.stock(product)}
    downstream.fault(operation, "error", count=2)
    assert await run_row(store, executor, user, product, quantity) == status
    assert_conserved(downstream, store, balances, stocks)
    order = queries.list_orders(store, queries.OrderFilter()).orders[0]
    assert sum(order.attempts.values()) == 2
    assert "injected fault" in (order.last_error or "")


async def test_timeout_is_an_unknown_outcome_and_retried(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    balances, stocks = (
        {ORDINARY_USER_ID: downstream.balance(ORDINARY_USER_ID)},
        {WIDGET_ID: downstream.stock(WIDGET_ID)},
    )
    downstream.fault("user.deduct", "timeout", seconds=1.5)  # the client gives up after 1 s
    assert await run_row(store, executor, ORDINARY_USER_ID, WIDGET_ID, 1) == "completed"
    assert_conserved(downstream, store, balances, stocks)
    assert "timed out" in (
        queries.list_orders(store, queries.OrderFilter()).orders[0].last_error or ""
    )


async def test_business_failure_is_not_retried(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    assert await run_row(store, executor, POOR_USER_ID, WIDGET_ID, 1) == "failed"  # 402, once
    order = queries.list_orders(store, queries.OrderFilter()).orders[0]
    assert "payment:deduct" not in order.attempts
    payment = [t for t in store.history(order.id) if t.scope == "payment"]
    assert payment[1].trigger == "fail" and payment[1].detail["status"] == 402


def short_deadline(store: Store, services: Services) -> Executor:
    # The first run's two attempts must end before the deadline: 0.5 s was too short under
    # CI load (the run itself outlasted it and compensated at once); 2 s leaves the margin.
    policy = RetryPolicy(max_attempts=2, backoff_base=0.01, backoff_max=0.02, step_deadline=2.0)
    return Executor(store=store, services=services, policy=policy)


async def test_forward_step_unknown_past_its_deadline_is_compensated(
    store: Store, services: Services, downstream: Downstream
) -> None:
    executor = short_deadline(store, services)
    balances, stocks = (
        {ORDINARY_USER_ID: downstream.balance(ORDINARY_USER_ID)},
        {WIDGET_ID: downstream.stock(WIDGET_ID)},
    )
    downstream.fault("inventory.deduct", "error", count=1000)  # an outage
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    await executor.drive(order)
    # The run's budget is spent before the deadline: the step stays unknown, persisted.
    assert (order.state, order.inventory_state) == ("steps_running", "requested")
    assert order.attempts["inventory:deduct"] == 2 and order.next_attempt_at is not None
    deadline = store.get(order.id).deadline_at
    assert deadline is not None
    await wait_until_async(past(deadline, utcnow), what="the step's deadline to pass")
    await executor.run(order.id)
    final = store.get(order.id)
    assert (final.status, final.inventory_state) == ("failed", "compensated")
    assert [t.trigger for t in store.history(order.id) if t.scope == "inventory"] == [
        "request",
        "expire",
        "compensate",
        "finish_compensation",
    ]
    assert_conserved(downstream, store, balances, stocks)


async def test_an_unknown_payment_of_an_unknown_user_expires_and_is_undone_without_parking(
    store: Store, services: Services, downstream: Downstream
) -> None:
    """The deduct for a user the service does not have stays unknown past its deadline: its
    refund is a no-op (nothing can have been charged to that user, SPEC §2). Before, the
    refund answered 404 and the order parked in needs_attention for ever."""
    executor = short_deadline(store, services)
    stocks = {WIDGET_ID: downstream.stock(WIDGET_ID)}
    downstream.fault("user.deduct", "error", count=1000)
    order, _ = await store.create_order(
        user_id=MISSING_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    await executor.drive(order)
    assert order.payment_state == "requested"
    deadline = store.get(order.id).deadline_at
    assert deadline is not None
    await wait_until_async(past(deadline, utcnow), what="the step's deadline to pass")
    await executor.run(order.id)
    final = store.get(order.id)
    assert (final.status, final.payment_state, final.attention_reason) == (
        "failed",
        "compensated",
        None,
    )
    payment = [t for t in store.history(order.id) if t.scope == "payment"]
    assert [t.trigger for t in payment] == [
        "request",
        "expire",
        "compensate",
        "finish_compensation",
    ]
    assert payment[-1].detail == {
        "user_id": MISSING_USER_ID,
        "order_id": str(order.id),
        "refunded": 0,
        "balance": None,
    }
    assert_conserved(downstream, store, {}, stocks)


async def test_unknown_outcome_is_reconciled_before_resending(
    store: Store, services: Services, downstream: Downstream
) -> None:
    executor = short_deadline(store, services)
    balances, stocks = (
        {ORDINARY_USER_ID: downstream.balance(ORDINARY_USER_ID)},
        {WIDGET_ID: downstream.stock(WIDGET_ID)},
    )
    # Every response is lost, but the first attempt applied the deduction.
    downstream.fault("inventory.deduct", "apply_then_error", count=1000)
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    await executor.drive(order)
    assert order.inventory_state == "requested"
    await executor.run(order.id)  # asks the service what happened instead of re-sending
    final = store.get(order.id)
    assert (final.status, final.attempts["inventory:deduct"]) == ("completed", 2)
    inventory = [t for t in store.history(order.id) if t.scope == "inventory"]
    assert [t.trigger for t in inventory] == ["request", "succeed"]
    assert inventory[1].detail is not None and inventory[1].detail["remaining"] >= 0
    assert_conserved(downstream, store, balances, stocks)


async def test_compensation_outage_parks_then_resume_finishes(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    stocks = {WIDGET_ID: downstream.stock(WIDGET_ID)}
    downstream.fault("inventory.restore", "error", count=1000)
    order, _ = await store.create_order(
        user_id=POOR_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    await executor.drive(order)
    assert (order.state, order.inventory_state) == ("needs_attention", "compensating")
    assert "inventory restore did not succeed" in (order.attention_reason or "")
    assert (
        downstream.stock(WIDGET_ID) == stocks[WIDGET_ID] - 1
    )  # not restored yet, and never skipped

    await executor.run(order.id)  # still down: parks again, retried not skipped
    assert store.get(order.id).state == "needs_attention"

    httpx_clear(downstream)
    await executor.run(order.id)
    final = store.get(order.id)
    assert (final.state, final.inventory_state, final.attention_reason) == (
        "failed",
        "compensated",
        None,
    )
    assert_conserved(downstream, store, {}, stocks)
    triggers = [t.trigger for t in store.history(order.id) if t.scope == "order"]
    assert triggers[-5:] == [
        "park",
        "retry_compensation",
        "park",
        "retry_compensation",
        "compensation_done",
    ]


def httpx_clear(downstream: Downstream) -> None:
    import httpx

    httpx.delete(f"{downstream.url}/_faults").raise_for_status()


async def test_cancellation_outage_parks_and_resumes_as_cancellation(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    balance = downstream.balance(ORDINARY_USER_ID)
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    await executor.drive(order)
    downstream.fault("user.refund", "error", count=1000)
    await executor.cancel(order.id)
    assert store.get(order.id).state == "needs_attention"
    httpx_clear(downstream)
    await executor.run(order.id)
    assert store.get(order.id).state == "cancelled"
    assert downstream.balance(ORDINARY_USER_ID) == balance


async def test_only_completed_orders_can_be_cancelled(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    order, _ = await store.create_order(
        user_id=POOR_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    await executor.drive(order)
    with pytest.raises(InvalidMove):
        await executor.cancel(order.id)
    assert store.get(order.id).lease_owner is None


async def test_stale_writer_is_rejected_and_nothing_is_recorded(store: Store) -> None:
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner="a"
    )
    stale = store.get(order.id)
    await store.record_transition(order=order, owner="a", scope="order", trigger="request_product")
    with pytest.raises(StaleOrder):
        await store.record_transition(
            order=stale, owner="a", scope="order", trigger="request_product"
        )
    with pytest.raises(LeaseLost):
        await store.record_transition(
            order=store.get(order.id), owner="b", scope="order", trigger="product_missing"
        )
    assert [t.trigger for t in store.history(order.id)] == ["request_product"]
    assert store.get(order.id).version == 1


async def test_lease_is_exclusive_until_released_or_expired(db_url: str) -> None:
    from fsm.store import make_engine

    engine = make_engine(db_url)
    short = Store(engine, lease_seconds=0.2)
    order, _ = await short.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    assert await short.claim(order_id=order.id, owner="a") is not None
    assert await short.claim(order_id=order.id, owner="b") is None
    assert await short.claim(order_id=order.id, owner="a") is not None  # re-entrant
    expiry = short.get(order.id).lease_expires_at
    assert expiry is not None
    wait_until(past(expiry, utcnow), what="a's lease to run out")
    assert await short.claim(order_id=order.id, owner="b") is not None  # expired: taken over
    with pytest.raises(LeaseLost):
        await short.record_transition(
            order=short.get(order.id), owner="a", scope="order", trigger="request_product"
        )
    # Only what one holds, at the version one last saw: a moved-on order keeps its lease.
    assert not await short.release(order_id=order.id, owner="b", version=order.version + 1)
    assert not await short.release(order_id=order.id, owner="a", version=order.version)
    assert short.get(order.id).lease_owner == "b"
    assert await short.release(order_id=order.id, owner="b", version=order.version)
    assert short.get(order.id).lease_owner is None
    engine.dispose()


async def test_parked_order_waits_with_growing_pauses_for_the_sweep(
    store: Store, services: Services, downstream: Downstream
) -> None:
    from fsm.recovery import resume_stuck

    # Pauses of park_min x 2^(parks - 1): 10 s, then 20 s (retries within a run stay short).
    policy = RetryPolicy(
        max_attempts=2, backoff_base=0.01, backoff_max=0.05, step_deadline=5, park_min=10
    )
    executor = Executor(store=store, services=services, policy=policy)
    downstream.fault("inventory.restore", "error", count=1000)
    order, _ = await store.create_order(
        user_id=POOR_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    await executor.drive(order)
    first = store.get(order.id)
    assert first.state == "needs_attention" and first.attempts["order:park"] == 1
    assert first.next_attempt_at is not None and first.next_attempt_at > first.updated_at

    # The sweep honours the pause; nothing is retried (and nothing logged) before it.
    swept = await resume_stuck(store=store, executor=executor, older_than=0, limit=10)
    assert swept.found == 0
    # An operator's resume retries now; the next pause is twice as long.
    forced = await resume_stuck(
        store=store, executor=executor, older_than=0, limit=10, due_only=False
    )
    assert (forced.found, forced.outcomes["needs_attention"]) == (1, 1)
    second = store.get(order.id)
    assert second.attempts["order:park"] == 2
    assert second.next_attempt_at is not None
    pause = (second.next_attempt_at - second.updated_at).total_seconds()
    first_pause = (first.next_attempt_at - first.updated_at).total_seconds()
    assert first_pause == pytest.approx(10, abs=1) and pause == pytest.approx(20, abs=1)


async def test_lease_is_renewed_while_a_slow_call_is_in_flight(
    db_url: str, services: Services, downstream: Downstream
) -> None:
    from fsm.store import make_engine

    engine = make_engine(db_url)
    store = Store(engine, lease_seconds=0.6)  # renewed every 0.2 s while driving
    executor = Executor(
        store=store,
        services=services,
        policy=RetryPolicy(max_attempts=2, backoff_base=0.01, step_deadline=5),
    )
    downstream.fault("shipping.schedule", "delay", seconds=0.9)  # under the 1 s client timeout
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    first_lease = store.get(order.id).lease_expires_at
    assert first_lease is not None
    run = asyncio.create_task(executor.drive(order))
    # Past the first lease's expiry, with the shipping call still in flight: only renewal
    # keeps the lease.
    await wait_until_async(past(first_lease, utcnow), what="the first lease to run out")
    assert not run.done()
    assert await store.claim(order_id=order.id, owner="intruder") is None
    await run
    assert store.get(order.id).status == "completed"
    assert await store.claim(order_id=order.id, owner="intruder") is not None  # released at the end
    engine.dispose()


async def test_a_corrupt_row_is_reported_and_never_driven(store: Store) -> None:
    from sqlalchemy import text

    from fsm.errors import CorruptOrder

    good, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    bad, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    with store.engine.begin() as conn:  # e.g. a hand-edited row, or a state from a future
        conn.execute(
            text("UPDATE orders SET payment_state = 'teleported' WHERE id = :id"),
            {"id": bad.id.hex if store.engine.dialect.name == "sqlite" else bad.id},
        )
    with pytest.raises(CorruptOrder, match="payment_state = 'teleported'"):
        store.get(bad.id)
    claimed = await store.claim_batch(owner="sweeper", moved_before=utcnow(), limit=10)
    assert [o.id for o in claimed] == [good.id]  # the sweep goes on without it
    with store.engine.connect() as conn:  # and left the corrupt row exactly as it was
        row = conn.execute(
            text(
                "SELECT payment_state, version, lease_owner FROM orders "
                "WHERE payment_state = 'teleported'"
            )
        ).one()
    assert tuple(row) == ("teleported", 0, None)
