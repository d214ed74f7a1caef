"""Reconciling an unknown outcome (SPEC §2, §3): once a forward call may have been applied
(an attempt answered 500, or the step resumed from `requested`), an answer that is not the
service's answer for the key -- a reconciliation lookup refused by a gateway -- never
marks the step failed ("had no effect"): the answer the service holds under the key
decides, or the step stays unknown until its deadline and is then compensated. On SQLite
and PostgreSQL, the live reference services behind a gateway (tests/support/gateway.py),
no mocks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm.executor import Executor
from fsm.models import Order
from fsm.store import Store
from fsm.wiring import build_executor
from tests.support.gateway import Gateway, answering, behind_gateway
from tests.support.services import Books, Downstream, assert_conserved
from tests.support.settings import saga_settings


@pytest.fixture
async def gateway(services_url: str) -> AsyncIterator[Gateway]:
    async with behind_gateway(services_url) as gateway:
        yield gateway


@pytest.fixture
def engine(db_url: str, store: Store, gateway: Gateway) -> Callable[..., Executor]:
    """An executor through the gateway, as `open_saga` builds it; its step deadline given."""

    def build(step_deadline: float = 60.0) -> Executor:
        settings = saga_settings(db_url, step_deadline=step_deadline)
        return build_executor(settings, store=store, services=gateway.services)

    return build


async def first_run(store: Store, executor: Executor, user: int = ORDINARY_USER_ID) -> Order:
    order, _ = await store.create_order(
        user_id=user, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    try:
        return await executor.drive(order)
    finally:
        await executor.aclose()


def payment(store: Store, order: Order) -> list[str]:
    return [t.trigger for t in store.history(order.id) if t.scope == "payment"]


def books(downstream: Downstream, *users: int) -> Books:
    return Books.read(downstream, users=users, products=[WIDGET_ID])


@pytest.mark.parametrize("status", [401, 403, 400, 405])
async def test_a_refused_lookup_leaves_the_outcome_unknown(
    status: int,
    store: Store,
    gateway: Gateway,
    downstream: Downstream,
    engine: Callable[..., Executor],
) -> None:
    """The deduct is applied, every answer lost; the resumed step's reconciliation GET is
    refused by the gateway. Before, that 4xx was taken for the deduct's "no": `failed`,
    never refunded. Now the step stays `requested` until a lookup gets through."""
    before = books(downstream, ORDINARY_USER_ID)
    executor = engine()
    downstream.fault("user.deduct", "apply_then_error", count=1000)
    order = await first_run(store, executor)
    assert order.payment_state == "requested"
    downstream.clear_faults()
    gateway.rule = answering("/_operations/", status, {"detail": "refused by the gateway"})
    await executor.run(order.id)
    await executor.aclose()
    stuck = store.get(order.id)
    assert (stuck.state, stuck.payment_state) == ("steps_running", "requested")
    assert f"{status}" in (stuck.last_error or "") and "outcome unknown" in stuck.last_error
    gateway.rule = None
    await executor.run(order.id)
    await executor.aclose()
    final = store.get(order.id)
    assert (final.status, final.payment_state) == ("completed", "succeeded")
    assert payment(store, final) == ["request", "succeed"]
    assert_conserved(downstream, before, [final])
