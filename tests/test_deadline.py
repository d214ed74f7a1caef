"""The order deadline (ORDER_SAGA_ORDER_DEADLINE, issue 22) on SQLite and PostgreSQL: an
order still waiting that long after creation stops waiting through the declared `deadline`
edge, its reason in the log: a stuck step expires and the order compensates with money
and stock conserved; one that never reached the steps fails having called nothing; a
parked compensation is left to the operator, flagged (a cancellation is past no
deadline). The kill -9 scenarios are in test_crash."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID, WIDGET_ID
from fsm.clients import Services
from fsm.executor import Executor
from fsm.store import Store
from fsm.wiring import build_executor
from tests.support.services import Books, Downstream, Fault, assert_conserved, set_faults
from tests.support.settings import saga_settings

PAYMENT_DOWN = Fault("user.deduct", "error")
REFUND_DOWN = Fault("user.refund", "error")


@pytest.fixture
async def late(db_url: str, store: Store, services: Services) -> AsyncIterator[Executor]:
    """An executor whose order deadline has passed for every order it meets."""
    settings = saga_settings(db_url, order_deadline=0.001)
    executor = build_executor(settings, store=store, services=services)
    yield executor
    await executor.aclose()


def triggers(store: Store, order_id: object) -> list[tuple[str, str]]:
    return [(t.scope, t.trigger) for t in store.history(order_id)]  # type: ignore[arg-type]


async def test_a_stuck_step_expires_and_the_order_compensates_conserving_the_books(
    store: Store, executor: Executor, late: Executor, downstream: Downstream
) -> None:
    books = Books.read(downstream, users=[ORDINARY_USER_ID], products=[WIDGET_ID])
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=2, owner=executor.owner
    )
    set_faults(downstream.url, [PAYMENT_DOWN])
    await executor.drive(order)  # no deadline: waits, payment unknown, the others done
    stuck = store.get(order.id)
    assert (stuck.state, stuck.payment_state) == ("steps_running", "requested")
    assert (stuck.inventory_state, stuck.shipping_state) == ("succeeded", "succeeded")

    final = await late.run(order.id)  # the payment service still down: it stops waiting

    assert (final.state, final.status) == ("failed", "failed")
    log = store.history(order.id)
    deadline = [t for t in log if t.trigger == "deadline"]
    assert [(t.from_state, t.to_state) for t in deadline] == [("steps_running", "compensating")]
    assert deadline[0].detail is not None and "order deadline" in deadline[0].detail["reason"]
    expired = [t for t in log if (t.scope, t.trigger) == ("payment", "expire")]
    assert expired and expired[0].seq < deadline[0].seq
    assert "order deadline" in (expired[0].detail or {})["reason"]
    assert {final.payment_state, final.inventory_state, final.shipping_state} == {"compensated"}
    assert_conserved(downstream, books, [final])


async def test_an_order_past_its_deadline_before_the_steps_fails_calling_nothing(
    store: Store, late: Executor, downstream: Downstream
) -> None:
    books = Books.read(downstream, users=[ORDINARY_USER_ID], products=[WIDGET_ID])
    order, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)

    final = await late.run(order.id)

    assert (final.state, final.status) == ("failed", "failed")
    assert triggers(store, order.id) == [("order", "deadline")]
    assert not [k for k in downstream.effects() if k.startswith(str(order.id))]
    assert_conserved(downstream, books, [final])


async def test_a_parked_order_is_left_to_the_operator_but_flagged(
    store: Store, executor: Executor, late: Executor, downstream: Downstream
) -> None:
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1, owner=executor.owner
    )
    set_faults(downstream.url, [REFUND_DOWN])
    await executor.drive(order)
    assert store.get(order.id).status == "needs_attention"

    final = await late.run(order.id)  # retries the refund (never skipped), parks again

    assert final.status == "needs_attention"
    assert final.attention_reason is not None
    assert final.attention_reason.startswith("past its order deadline: ")
    assert ("order", "deadline") not in triggers(store, order.id)
    park = [t for t in store.history(order.id) if t.trigger == "park"][-1]
    assert park.detail is not None and park.detail["deadline"] is not None


async def test_without_a_deadline_nothing_changes(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    final = await executor.drive(order)
    assert final.status == "completed"
    assert ("order", "deadline") not in triggers(store, order.id)


async def test_a_cancellation_is_past_no_deadline(
    store: Store, executor: Executor, late: Executor, downstream: Downstream
) -> None:
    """The order deadline bounds how long an order takes to reach its outcome; the owner's
    cancellation of a completed order is a new request after it. It is never cut short,
    and when it parks its reason says what happened (the refund did not succeed), not
    "past its order deadline"; nor does the park's log row carry a deadline."""
    books = Books.read(downstream, users=[ORDINARY_USER_ID], products=[WIDGET_ID])
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    assert (await executor.drive(order)).state == "completed"
    set_faults(downstream.url, [REFUND_DOWN])

    parked = await late.cancel(order.id)  # created longer ago than its deadline

    assert (parked.state, parked.cancel_requested) == ("needs_attention", True)
    assert parked.attention_reason is not None
    assert parked.attention_reason.startswith("payment refund did not succeed: ")
    assert (parked.inventory_state, parked.shipping_state) == ("compensated", "compensated")
    park = [t for t in store.history(order.id) if t.trigger == "park"][-1]
    assert park.detail is not None and "deadline" not in park.detail
    assert ("order", "deadline") not in triggers(store, order.id)

    final = await late.run(order.id)  # parks again the same way while the refund is down
    assert final.attention_reason is not None
    assert final.attention_reason.startswith("payment refund did not succeed: ")
    set_faults(downstream.url, ())
    final = await late.run(order.id)
    assert (final.state, final.status) == ("cancelled", "cancelled")
    assert_conserved(downstream, books, [final])
