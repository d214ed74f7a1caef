"""The benchmark's fake services keep the reference services' promises that the engine
relies on: idempotency per key (replay, 422 on reuse, lookup), business failures, and a
bounded memory. No speed is asserted here."""

from __future__ import annotations

import pytest

from bench.fakes import Ledger, fake_services
from downstream.seed import (
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    RICH_USER_ID,
    WIDGET_ID,
)
from fsm.errors import BusinessFailure, NotFound


async def test_same_key_replays_without_a_second_effect() -> None:
    ledger = Ledger()
    user = fake_services(ledger)["user"]
    first = await user.deduct(
        user_id=RICH_USER_ID, amount=1999, order_id="o1", key="o1:payment:deduct"
    )
    again = await user.deduct(
        user_id=RICH_USER_ID, amount=1999, order_id="o1", key="o1:payment:deduct"
    )
    assert again == first
    assert ledger.balances[RICH_USER_ID] == 1_000_000_000 - 1999
    assert ledger.effects == 1
    assert await user.lookup("o1:payment:deduct") == first
    assert await user.lookup("never-sent") is None


async def test_key_reused_for_another_request_is_refused_and_changes_nothing() -> None:
    ledger = Ledger()
    stock = fake_services(ledger)["inventory"]
    await stock.deduct(product_id=WIDGET_ID, quantity=1, order_id="o1", key="k")
    with pytest.raises(BusinessFailure) as refused:
        await stock.deduct(product_id=WIDGET_ID, quantity=2, order_id="o1", key="k")
    assert refused.value.status == 422
    assert ledger.stock[WIDGET_ID] == 1_000_000 - 1


async def test_failures_are_business_failures_and_replay_as_such() -> None:
    services = fake_services()
    with pytest.raises(NotFound):
        await services.product.get(MISSING_PRODUCT_ID)
    with pytest.raises(BusinessFailure) as poor:
        await services["user"].deduct(
            user_id=POOR_USER_ID, amount=1999, order_id="o2", key="o2:pay"
        )
    assert poor.value.status == 402
    with pytest.raises(BusinessFailure):  # lookup replays the stored "no"
        await services["user"].lookup("o2:pay")
    with pytest.raises(BusinessFailure) as too_many:
        await services["shipping"].schedule(
            order_id="o3", user_id=ORDINARY_USER_ID, quantity=11, key="o3:ship"
        )
    assert too_many.value.status == 422


async def test_compensation_gives_back_and_refuses_a_late_forward_request() -> None:
    ledger = Ledger()
    user = fake_services(ledger)["user"]
    await user.deduct(user_id=ORDINARY_USER_ID, amount=500, order_id="o4", key="o4:d")
    refund = await user.refund(user_id=ORDINARY_USER_ID, amount=500, order_id="o4", key="o4:r")
    assert refund["refunded"] == 500
    assert ledger.balances[ORDINARY_USER_ID] == 100_000
    with pytest.raises(BusinessFailure) as late:
        await user.deduct(user_id=ORDINARY_USER_ID, amount=500, order_id="o4", key="o4:d2")
    assert late.value.status == 409


async def test_memory_stays_bounded() -> None:
    ledger = Ledger(window=100)
    shipping = fake_services(ledger)["shipping"]
    for n in range(1000):
        await shipping.schedule(order_id=f"o{n}", user_id=RICH_USER_ID, quantity=1, key=f"o{n}:s")
    assert len(ledger.answers) == 100
    assert len(ledger.held) == 100
