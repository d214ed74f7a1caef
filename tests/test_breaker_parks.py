"""SPEC §2 behind an open circuit breaker: a compensation (or a cancellation) whose
operation's breaker stays open waits for it no longer than its run's retry budget
(MAX_ATTEMPTS x BACKOFF_MAX), then the order parks in needs_attention saying which breaker,
and `POST /orders/{id}/resume` and `/cancel` answer instead of hanging; once the service is
back a resume finishes it, each effect applied once. Engine and API, SQLite and PostgreSQL,
real reference services and real breakers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import pytest

from downstream.seed import ORDINARY_USER_ID, POOR_USER_ID, WIDGET_ID
from fsm import queries, why
from fsm.breaker import HALF_OPEN, Breakers
from fsm.clients import Services
from fsm.executor import Executor
from fsm.models import Order
from fsm.store import Store
from fsm.why import Kind
from fsm.wiring import build_executor
from tests.support.api import served_api
from tests.support.services import Books, Downstream, assert_conserved, order_effects
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until, wait_until_async

T = TypeVar("T")
# A safety net, not a timing assertion: the bound itself is MAX_ATTEMPTS x BACKOFF_MAX
# (0.15 s under tests.support.settings.FAST); before the fix these waited for ever.
ANSWERED_WITHIN = 30.0
# Long enough that the breaker is still open when the runs below read it, short enough to
# wait for its probe once the fault is cleared.
COOLDOWN = 0.5


async def bounded(run: Awaitable[T]) -> T:
    return await asyncio.wait_for(run, ANSWERED_WITHIN)


@asynccontextmanager
async def guarded(
    db_url: str, store: Store, services: Services, **breaker: Any
) -> AsyncIterator[tuple[Executor, Breakers]]:
    """The engine as `serve` runs it, every call behind its operation's breaker."""
    breakers = Breakers(**({"threshold": 1, "cooldown": COOLDOWN} | breaker))
    executor = build_executor(saga_settings(db_url), store=store, services=breakers.wrap(services))
    try:
        yield executor, breakers
    finally:
        await executor.aclose()


def parked_on(store: Store, db_url: str, order: Order, operation: str) -> Order:
    """The order parked, its reason, last error and `why` all naming `operation`'s breaker."""
    now = store.get(order.id)
    assert now.state == "needs_attention", now
    reason = now.attention_reason or ""
    assert f"waiting on the breaker of {operation}: parked" in reason, reason
    assert operation in (now.last_error or ""), now.last_error
    # The wait that ran out made no call: it spent no attempt (only real calls count).
    counted = [a for a in queries.attempts(store, order.id) if not a.waiting_on]
    assert not [a for a in counted if "no call made" in (a.error or "")], counted
    # Retried sooner than an ordinary park (PARK_MIN, 300 s): from the run's breaker
    # patience (0.15 s here), doubling per park, so an outage's end is not followed by
    # minutes of parked compensations.
    assert now.next_attempt_at is not None
    assert (now.next_attempt_at - now.updated_at).total_seconds() < 10, now.next_attempt_at
    w = why.for_order(store, now, saga_settings(db_url))
    assert w is not None and w.kind is Kind.PARKED, w
    assert f"waiting on the breaker of {operation}" in w.summary, w.summary
    return now


def order_triggers(store: Store, order: Order) -> list[str]:
    return [t.trigger for t in store.history(order.id) if t.scope == "order"]


async def test_a_compensation_behind_an_open_breaker_parks_and_a_resume_finishes_it(
    db_url: str, store: Store, services: Services, downstream: Downstream
) -> None:
    books = Books.read(downstream, users=[POOR_USER_ID], products=[WIDGET_ID])
    downstream.fault("inventory.restore", "error", count=1000)
    async with guarded(db_url, store, services) as (executor, breakers):
        order, _ = await store.create_order(
            user_id=POOR_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
        )
        await bounded(executor.drive(order))  # payment 402: restore (fails, opens) + cancel
        parked = parked_on(store, db_url, order, "inventory.restore")
        assert parked.inventory_state == "compensating"  # never skipped
        assert downstream.stock(WIDGET_ID) == books.stocks[WIDGET_ID] - 1  # not restored yet
        assert [a for a in queries.attempts(store, order.id) if a.waiting_on]  # it did wait

        await bounded(executor.run(order.id))  # still failing: parks again, in bounded time
        again = parked_on(store, db_url, order, "inventory.restore")
        # Outage parks count apart: a real failure later starts from PARK_MIN again.
        assert again.attempts.get("order:outage_park") == 2, again.attempts
        assert "order:park" not in again.attempts, again.attempts

        downstream.clear_faults()
        restore = breakers["inventory.restore"]
        await wait_until_async(lambda: restore.state == HALF_OPEN, 10, what="the probe")
        final = await bounded(executor.run(order.id))
    assert (final.state, final.inventory_state, final.attention_reason) == (
        "failed",
        "compensated",
        None,
    )
    assert order_triggers(store, order)[-5:] == [
        "park",
        "retry_compensation",
        "park",
        "retry_compensation",
        "compensation_done",
    ]
    assert_conserved(downstream, books, [store.get(order.id)])  # restored once


async def test_a_cancellation_behind_an_open_breaker_parks_and_a_resume_finishes_it(
    db_url: str, store: Store, services: Services, downstream: Downstream
) -> None:
    books = Books.read(downstream, users=[ORDINARY_USER_ID], products=[WIDGET_ID])
    async with guarded(db_url, store, services) as (executor, breakers):
        order, _ = await store.create_order(
            user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
        )
        assert (await bounded(executor.drive(order))).state == "completed"
        downstream.fault("shipping.cancel", "error", count=1000)

        await bounded(executor.cancel(order.id))
        parked = parked_on(store, db_url, order, "shipping.cancel")
        assert parked.cancel_requested and parked.shipping_state == "compensating"
        done = order_effects(downstream.effects(), order.id)
        assert done.get("payment:refund") == done.get("inventory:restore") == 1

        downstream.clear_faults()
        cancel = breakers["shipping.cancel"]
        await wait_until_async(lambda: cancel.state == HALF_OPEN, 10, what="the probe")
        final = await bounded(executor.run(order.id))
    assert (final.state, final.status) == ("cancelled", "cancelled")
    assert order_triggers(store, order)[-4:] == [
        "cancel",
        "park",
        "retry_cancellation",
        "cancellation_done",
    ]
    assert_conserved(downstream, books, [final])  # refunded and restored once


# -- the API, served for real: an answer that never comes fails the test, not the run ------


@pytest.fixture
def served(db_url: str, services_url: str) -> Callable[..., Any]:
    def serve(**overrides: Any) -> Any:
        return served_api(db_url, services_url, breaker_cooldown=1.0, **overrides)

    return serve


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=ANSWERED_WITHIN) as client:
        yield client


def breaker_state(http: httpx.Client, url: str, operation: str) -> str:
    return str(http.get(f"{url}/healthz").json().get("breakers", {}).get(operation, "closed"))


def test_resume_of_an_order_whose_compensation_breaker_stays_open_answers(
    served: Callable[..., Any], http: httpx.Client, downstream: Downstream
) -> None:
    """The reviewer's case: the order parks after its own attempts (fewer than the
    breaker's threshold); the resume's failures open the breaker, and the resume used to
    wait on it for ever (a second resume: 409)."""
    books = Books.read(downstream, users=[POOR_USER_ID], products=[WIDGET_ID])
    downstream.fault("inventory.restore", "error", count=1000)
    with served() as url:
        body = {"user_id": POOR_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
        order_id = http.post(f"{url}/orders", json=body).json()["id"]
        wait_until(
            lambda: http.get(f"{url}/orders/{order_id}").json()["state"] == "needs_attention",
            what="the order to park",
        )
        assert breaker_state(http, url, "inventory.restore") == "closed"  # its own budget

        resumed = http.post(f"{url}/orders/{order_id}/resume")

        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["state"] == "needs_attention"
        assert breaker_state(http, url, "inventory.restore") != "closed"
        shown = http.get(f"{url}/orders/{order_id}").json()
        assert shown["why"]["kind"] == "parked", shown["why"]
        assert "waiting on the breaker of inventory.restore: parked" in shown["why"]["reason"]
        again = http.post(f"{url}/orders/{order_id}/resume")  # nothing holds it: not a 409
        assert again.status_code == 200, again.text

        downstream.clear_faults()
        wait_until(
            lambda: breaker_state(http, url, "inventory.restore") == HALF_OPEN,
            what="the breaker's probe",
        )
        final = http.post(f"{url}/orders/{order_id}/resume")
        assert final.status_code == 200, final.text
        assert (final.json()["state"], final.json()["steps"]["inventory"]) == (
            "failed",
            "compensated",
        )
    effects = order_effects(downstream.effects(), uuid.UUID(order_id))
    assert effects["inventory:restore"] == 1 and effects["shipping:cancel"] == 1
    assert downstream.stock(WIDGET_ID) == books.stocks[WIDGET_ID]


def test_cancel_of_an_order_whose_cancellation_breaker_stays_open_answers(
    served: Callable[..., Any], http: httpx.Client, downstream: Downstream
) -> None:
    books = Books.read(downstream, users=[ORDINARY_USER_ID], products=[WIDGET_ID])
    with served(breaker_threshold=2) as url:
        body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
        placed = http.post(f"{url}/orders", json=body)
        assert placed.status_code == 201, placed.text
        order_id = placed.json()["id"]
        downstream.fault("shipping.cancel", "error", count=1000)

        cancelled = http.post(f"{url}/orders/{order_id}/cancel")

        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "needs_attention"
        shown = http.get(f"{url}/orders/{order_id}").json()
        assert shown["why"]["kind"] == "parked", shown["why"]
        assert "waiting on the breaker of shipping.cancel: parked" in shown["why"]["reason"]

        downstream.clear_faults()
        wait_until(
            lambda: breaker_state(http, url, "shipping.cancel") == HALF_OPEN,
            what="the breaker's probe",
        )
        final = http.post(f"{url}/orders/{order_id}/resume")
        assert final.status_code == 200, final.text
        assert final.json()["state"] == "cancelled"
    effects = order_effects(downstream.effects(), uuid.UUID(order_id))
    assert effects["payment:refund"] == effects["inventory:restore"] == 1
    assert downstream.balance(ORDINARY_USER_ID) == books.balances[ORDINARY_USER_ID]
    assert downstream.stock(WIDGET_ID) == books.stocks[WIDGET_ID]
